"""hpc_elastic: fault-tolerant elastic PyTorch training on Slurm clusters.

The package is split by concern, and data flows one way:
config -> submission -> agent -> files in the job directory -> analysis.
"""

__version__ = "0.1.0"
