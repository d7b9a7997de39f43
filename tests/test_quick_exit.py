"""The agent's quick exit (hpc_elastic/agent/quick_exit.py) skips only the interpreter's
teardown: what a normal exit would still have done -- the last buffered output, ``atexit``
callbacks, log handlers flushed by ``logging.shutdown``, a non-daemon thread's last write, a
thread pool's pending task -- is all done before the process ends, with the given exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHILD = r"""
import atexit, logging, logging.handlers, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from hpc_elastic.agent.quick_exit import exit_now

out = Path(sys.argv[1])
# A handler that keeps records until it is closed: only logging.shutdown writes them.
target = logging.FileHandler(out / "log.txt")
logging.getLogger().addHandler(logging.handlers.MemoryHandler(1000, logging.CRITICAL, target))
logging.getLogger().setLevel(logging.INFO)
atexit.register(lambda: (out / "atexit.txt").write_text("ran"))

def last_write():
    time.sleep(0.3)
    (out / "thread.txt").write_text("done")

threading.Thread(target=last_write).start()
pool = ThreadPoolExecutor(1)
pool.submit(lambda: (time.sleep(0.3), (out / "pool.txt").write_text("done")))
sys.stdout.write("the last line, still in the buffer")  # a pipe: block-buffered
logging.info("the last record")
exit_now(7)
"""


def test_quick_exit_finishes_what_a_normal_exit_would(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 7, result.stderr
    assert result.stdout == "the last line, still in the buffer"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert "the last record" in (tmp_path / "log.txt").read_text()
    assert (tmp_path / "thread.txt").read_text() == "done"
    assert (tmp_path / "pool.txt").read_text() == "done"
