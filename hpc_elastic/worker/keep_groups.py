"""Keep the process groups a script destroys alive until the script has ended.

Why: torch 2.13 can deadlock a DDP worker on gloo when the script returns. Measured here with a
plain DDP script that calls ``destroy_process_group()`` and returns, forked after
``import torch._dynamo`` (the warm-start standby, hpc_elastic/worker/standby.py): 7 of 30 runs
hung for good at exit, stacks taken with gdb:

* ``destroy_process_group`` forgets the group, but the script's ``DistributedDataParallel``
  still holds it (its C++ ``Reducer``). When the script's frame is cleared, the ``Reducer`` is
  freed -- under the GIL (its pybind binding does not release it) -- and, holding the last
  reference, destroys the gloo group, which joins its worker threads.
* One of those threads was still dropping the last collective's work object. Dropping a tensor
  that has a Python object takes the GIL. The main thread holds it and waits for the join:
  neither moves (a race: the same script forked without that import hung 0 of 30 times, fresh
  processes 0 of 10 -- the timing differs, the bug is torch's).

With a reference kept here, the ``Reducer`` never holds the last one. The groups are let go in
:func:`release`, after the script returned and its frames are gone, from Python: there the
group's binding releases the GIL before its destructor joins, so the gloo thread finishes.
Measured: 0 of 60 runs hung with this, against 2 of 10 without, in the same session.

The cost: a destroyed group's Python object (and with gloo, its idle threads and sockets) lives
until the script ends instead of until the last reference goes. Nothing else changes: the call
still goes to torch's own ``destroy_process_group`` with the same arguments.

Installed only where ``torch.distributed`` is already imported when the worker starts (the
forked warm workers): this module never imports torch, so a cold worker's start is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["install", "release"]

_C10D = "torch.distributed.distributed_c10d"
_MARK = "_hpc_elastic_keeps_groups"

_kept: list[Any] = []


def _groups_destroyed_by(c10d: Any, group: Any) -> list[Any]:
    """The groups a ``destroy_process_group(group)`` call is about to forget: every group for
    the default one (or None), else just ``group``."""
    world_group = getattr(getattr(c10d, "GroupMember", None), "WORLD", None)
    if group is not None and group is not world_group:
        return [group]
    pg_map = getattr(getattr(c10d, "_world", None), "pg_map", None)
    if isinstance(pg_map, dict):
        return list(pg_map)
    return [world_group] if world_group is not None else []


def _keeping(c10d: Any, destroy: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(destroy)
    def destroy_process_group(group: Any = None, *args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(Exception):  # never stand between a script and torch
            _kept.extend(_groups_destroyed_by(c10d, group))
        return destroy(group, *args, **kwargs)

    setattr(destroy_process_group, _MARK, True)
    return destroy_process_group


def install() -> bool:
    """Wrap ``destroy_process_group`` (in ``torch.distributed`` and its c10d module) if torch's
    distributed package is already imported; False if it is not, or already wrapped."""
    c10d = sys.modules.get(_C10D)
    destroy = getattr(c10d, "destroy_process_group", None)
    if destroy is None or getattr(destroy, _MARK, False):
        return False
    wrapper = _keeping(c10d, destroy)
    c10d.destroy_process_group = wrapper  # type: ignore[union-attr]
    package = sys.modules.get("torch.distributed")
    if getattr(package, "destroy_process_group", None) is destroy:
        package.destroy_process_group = wrapper  # type: ignore[union-attr]
    return True


def release() -> None:
    """Let the kept groups go. Call it once the script's frames are gone (after ``runpy``
    returned), so these are the last references."""
    _kept.clear()
