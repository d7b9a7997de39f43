"""The per-node agent: what ``srun`` starts once per node (``hpc-elastic agent JOBDIR``).

``runner`` builds torch's ``LocalElasticAgent`` from the job's resolved config and runs it;
``worker_logs`` puts each worker's output into the job directory; ``preemption`` turns Slurm's
warning signal into a checkpoint-and-requeue.
"""
