"""Scoring shared by training and evals: masks, padding, log-likelihoods, token log-probs, top-k KL, the base cache."""
