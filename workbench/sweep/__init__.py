"""`workbench sweep`: grid and random searches over recipe overrides, with a leaderboard.

spec (the spec, its trials and jobs; no torch), wandb_sweep (the `wandb sweep` YAML),
leaderboard (ranking), runner (`run_sweep`: running the jobs).
"""
