"""Which worker failures the agent takes for the echo of a peer's loss
(hpc_elastic/agent/runner.py ``echoes_a_lost_peer``): only then does it wait for the rendezvous
to say whether a member is lost, instead of counting a restart at once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hpc_elastic.agent.runner import echoes_a_lost_peer

GLOO_CLOSED = ("RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/"
               "pair.cc:553] Connection closed by peer [127.0.0.1]:36549. This is typically "
               "caused by a remote worker crashing.")
NCCL_REMOTE = ("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, "
               "remote process exited or there was a network error, NCCL version 2.21.5\n"
               "ncclRemoteError: A call failed possibly due to a network error or a remote "
               "process exiting prematurely.")


def failed(message: object) -> SimpleNamespace:
    return SimpleNamespace(message=message)


@pytest.mark.parametrize("failures, echo", [
    ({0: failed(GLOO_CLOSED)}, True),
    # torch's error-file form: a dict with the message inside
    ({0: failed({"message": GLOO_CLOSED, "extraInfo": {}}), 1: failed(NCCL_REMOTE)}, True),
    ({0: failed("RuntimeError: Connection reset by peer")}, True),
    # one rank with a fault of its own: not an echo
    ({0: failed(GLOO_CLOSED), 1: failed("ValueError: loss is nan")}, False),
    ({0: failed("Signal 9 (SIGKILL) received by PID 4242")}, False),
    ({0: failed("ZeroDivisionError: division by zero")}, False),
    ({}, False),
])
def test_only_failures_that_all_lost_a_peer_are_an_echo(failures: dict, echo: bool) -> None:
    assert echoes_a_lost_peer(failures) is echo
