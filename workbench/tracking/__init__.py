"""Weights & Biases tracking: training runs and eval results. Never stops a job."""
