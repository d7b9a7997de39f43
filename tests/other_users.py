"""Second, unprivileged users for tests where a file's owner matters (tests run as root).

``useradd`` is serialised on ``/etc/passwd``'s lock, which another test process may hold for a
moment: each call is retried briefly. The users have no home and no login shell; tests act as
them with ``subprocess.run(..., user=..., group=...)``.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import pytest


def _retry(args: list[str]) -> None:
    for _ in range(50):
        result = subprocess.run(args, capture_output=True, text=True)
        if result.returncode in (0, 9):  # 9: the name exists already
            return
        time.sleep(0.1)
    raise RuntimeError(f"{' '.join(args)} failed: {result.stderr}")


def ensure_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        _retry(["groupadd", name])
        return grp.getgrnam(name).gr_gid


def ensure_user(name: str, groups: tuple[str, ...] = ()) -> int:
    """The uid of ``name``, created if missing, a member of ``groups`` (created if missing)."""
    for group in groups:
        ensure_group(group)
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        args = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
        if groups:
            args[1:1] = ["--groups", ",".join(groups)]
        _retry(args)
        uid = pwd.getpwnam(name).pw_uid
    for group in groups:
        if name not in grp.getgrnam(group).gr_mem:
            _retry(["usermod", "--append", "--groups", group, name])
    return uid


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("creates a second user: needs root")


def as_user(name: str, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``args`` as ``name`` with its supplementary groups."""
    entry = pwd.getpwnam(name)
    groups = [g.gr_gid for g in grp.getgrall() if name in g.gr_mem]
    return subprocess.run(list(args), user=entry.pw_uid, group=entry.pw_gid,
                          extra_groups=groups, capture_output=True, text=True,
                          timeout=120, **kwargs)  # type: ignore[call-overload]


def run_as(name: str, func: Callable[[], int]) -> tuple[int, str]:
    """Call ``func`` in a forked child acting as ``name``; return its result and its stderr.

    In-process because the interpreter lives under /root, which another user cannot execute:
    import what ``func`` needs before calling this (the child may not read /root either)."""
    entry = pwd.getpwnam(name)
    groups = [g.gr_gid for g in grp.getgrall() if name in g.gr_mem]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 125
        try:
            os.close(read)
            sys.stderr = sys.stdout = os.fdopen(write, "w")
            os.setgroups(groups)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            code = func()
        except BaseException:  # noqa: BLE001 - reported to the parent through stderr
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output
