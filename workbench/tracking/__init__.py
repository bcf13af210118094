"""Weights & Biases tracking: training runs, eval results and gate decisions. Never stops a job.

names (run names, groups, config, tags, mode; no wandb or torch), runs (run.json's list of the
W&B runs of a fine-tune), wandb_run (the guarded `Tracker`), training (the Trainer callback and
`TrainingObserver`), evals (`log_eval` and its tables), gates (`log_gate`).
"""
