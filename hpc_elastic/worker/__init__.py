"""Code that runs inside the worker processes (the user's training script), injected by the agent.

``python -m hpc_elastic.worker SCRIPT ARGS...`` (or ``-m MODULE ARGS...``) installs the progress
reporter (:mod:`hpc_elastic.worker.beat`) and then runs the script exactly as ``python SCRIPT``
would. The agent starts its workers this way, so no training script needs a change.
"""
