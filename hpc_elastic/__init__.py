"""hpc_elastic: fault-tolerant elastic PyTorch training on Slurm clusters.

The package is split by concern, and data flows one way:
config -> submission -> agent -> files in the job directory -> analysis.

The public Python API (docs/python-api.md) is re-exported here and imported on first use, so
``import hpc_elastic`` stays light (no torch, no submitit)::

    import hpc_elastic
    job = hpc_elastic.submit(hpc_elastic.load_config("job.yaml", ["nodes=2"]))
    outcome = job.wait()
    print(job.summary().root_causes)
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = ("Cause", "Failure", "Job", "JobNotFound", "JobState", "Outcome", "SubmitError",
        "Summary", "dry_run", "load_config", "recent_jobs")

if TYPE_CHECKING:
    from hpc_elastic.api import (  # noqa: F401
        Cause,
        Failure,
        Job,
        JobNotFound,
        JobState,
        Outcome,
        SubmitError,
        Summary,
        dry_run,
        load_config,
        recent_jobs,
    )
    from hpc_elastic.config import ConfigError, JobConfig  # noqa: F401


def submit(config: Any, local: bool | None = None, **options: Any) -> Job:
    """Submit a job; see :func:`hpc_elastic.api.submit` (defined here so that the name stays the
    function after the ``hpc_elastic.submit`` module, which writes job directories, is imported)."""
    from hpc_elastic.api import submit as _submit

    return _submit(config, local, **options)


def report_progress(step: int | None = None) -> None:
    """Tell this rank's agent it made progress (optional: optimizer steps count by themselves).

    See :func:`hpc_elastic.worker.beat.report_progress`; a no-op outside an hpc_elastic worker.
    """
    from hpc_elastic.worker.beat import report_progress as _report

    _report(step)


class _Package(types.ModuleType):
    """Keeps :func:`submit` the package's ``submit``: importing a submodule sets the parent's
    attribute of that name, and ``hpc_elastic/submit.py`` is a module of the same name (it is
    still found as ``sys.modules["hpc_elastic.submit"]`` and by ``from hpc_elastic.submit
    import ...``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "submit" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    """Import the API module on first use of one of its names (PEP 562)."""
    if name in _API:
        from hpc_elastic import api

        return getattr(api, name)
    if name in ("ConfigError", "JobConfig"):
        from hpc_elastic import config

        return getattr(config, name)
    raise AttributeError(f"module 'hpc_elastic' has no attribute {name!r}")


__all__ = [*_API, "ConfigError", "JobConfig", "__version__", "report_progress", "submit"]
