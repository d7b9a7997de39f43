"""Post-run analysis of a job directory's JSON-lines logs (``hpc-elastic logs ...``).

Everything here reads files only: no torch, no agent, no rendezvous imports, so the commands
work on a login node against a job that ran (or still runs) elsewhere. One module per command
(:mod:`.summary`, :mod:`.timeline`, :mod:`.failures`, :mod:`.metrics`, :mod:`.plot`), the shared
streaming readers in :mod:`.loader` and the argparse glue in :mod:`.cli`.
"""

from __future__ import annotations

from .loader import Job, JobNotFound, open_job

__all__ = ["Job", "JobNotFound", "open_job"]
