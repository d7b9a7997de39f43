"""Exceptions of the shared-filesystem rendezvous.

Every error a user can fix is a :class:`SharedFSConfigError`: it subclasses torch's
``RendezvousError`` (so the elastic agent treats it as a rendezvous failure and does not retry
blindly) *and* ``ValueError`` (so code that validates inputs can catch it the usual way). Its
message is one paragraph that names the setting at fault and how to fix it, because it is
usually read in a Slurm log by someone who did not write the code.
"""

from __future__ import annotations

from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousStateError


class SharedFSRendezvousError(RendezvousError):
    """Base class of every error raised by the ``sharedfs`` rendezvous."""


class SharedFSConfigError(SharedFSRendezvousError, ValueError):
    """A setting (directory, run id, node counts, timeouts, lock mode) cannot work.

    Raised before anything is written to the rendezvous directory whenever possible.
    """


class LockingUnsupportedError(SharedFSConfigError):
    """The shared filesystem refuses ``flock`` (Lustre without ``-o flock``, NFS with ``nolock``).

    We never fall back to a marker-file lock: a SIGKILLed holder would leave it behind and every
    other node would wait forever, which is worse than failing at start-up with this message.
    """


class StateCorruptError(SharedFSRendezvousError, RendezvousStateError):
    """The rendezvous state file exists but cannot be decoded (foreign or damaged file)."""


class StateUnavailableError(SharedFSRendezvousError):
    """The state could not be read through this node's filesystem client for a while
    (``ESTALE``, ``ENOENT`` after a rename, partial contents: all retried first)."""


class FencedError(SharedFSRendezvousError):
    """This node can no longer take part safely: a write to the shared directory could not be
    made durable (``fsync``/``close`` failed: the client lost its connection and maybe its lock),
    or its own heartbeat could not be written for longer than the others wait for it.

    The agent must stop its workers and leave: the other nodes re-form without it."""


class RunIdInUseError(SharedFSConfigError):
    """The run id (and attempt) is used by another, live run in the same directory."""
