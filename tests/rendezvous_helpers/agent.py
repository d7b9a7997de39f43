"""One "node" of the rendezvous tests: torch's ``LocalElasticAgent`` with the sharedfs handler.

Usage: ``python agent.py --root DIR --run-id ID --nnodes 2:3 --nproc 2 --out OUT
[--conf key=value ...] -- WORKER_ARGS...`` (the worker is ``worker.py`` next to this file).
Exit code 0 when the agent's workers succeeded (or the node exited gracefully), 1 otherwise;
the result is also written to ``OUT/agents/<pid>.json``. The environment should carry
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, like the real per-node agent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs

from hpc_elastic.rendezvous import create_handler

WORKER = Path(__file__).with_name("worker.py")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--nnodes", default="1:1")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--max-restarts", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--conf", action="append", default=[], help="key=value setting")
    parser.add_argument("worker_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    lo, _, hi = args.nnodes.partition(":")
    settings = dict(kv.split("=", 1) for kv in args.conf)
    handler = create_handler(args.root, args.run_id, int(lo), int(hi or lo),
                             local_addr="127.0.0.1", **settings)
    out = Path(args.out)
    worker_args = [a for a in args.worker_args if a != "--"]
    spec = WorkerSpec(
        role="trainer",
        local_world_size=args.nproc,
        entrypoint=sys.executable,
        args=("-u", str(WORKER), "--out", str(out), *worker_args),
        rdzv_handler=handler,
        max_restarts=args.max_restarts,
        monitor_interval=0.1,
    )
    logs = DefaultLogsSpecs(log_dir=str(out / "logs" / f"agent-{os.getpid()}"))
    agent = LocalElasticAgent(spec, logs_specs=logs, start_method="spawn",
                              exit_barrier_timeout=60)
    state = "FAILED"
    try:
        result = agent.run()
        state = "GRACEFUL_EXIT" if result is None else result.state.name
    finally:
        handler.shutdown()
        record = {
            "pid": os.getpid(),
            "state": state,
            "restarts": args.max_restarts - agent._remaining_restarts,
            "round": handler.round,
            "node": handler.node_id,
        }
        (out / "agents").mkdir(parents=True, exist_ok=True)
        (out / "agents" / f"{os.getpid()}.json").write_text(json.dumps(record))
    return 0 if state in ("SUCCEEDED", "GRACEFUL_EXIT") else 1


if __name__ == "__main__":
    sys.exit(main())
