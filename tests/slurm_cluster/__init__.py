"""The private multi-node Slurm test cluster: start.sh/stop.sh and the pytest fixture."""
