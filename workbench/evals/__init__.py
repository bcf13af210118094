"""Metrics for retention and overfitting evals: a fine-tuned checkpoint against its base."""
