"""Weights & Biases tracking: training runs and eval results. Never stops a job.

names (run names, groups, config, mode; no wandb or torch), wandb_run (the guarded `Tracker`),
training (the Trainer callback and `TrainingObserver`), evals (`log_eval` and its tables).
"""
