"""Training: the trainer, the regularizers, the Fisher and the KL reference cache. Never imports evals."""
