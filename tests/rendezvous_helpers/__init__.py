"""Helpers of the rendezvous tests: a stand-in training script, an agent launcher, a harness."""
