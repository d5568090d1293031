"""Training: train state, steps, checkpoints, metrics (used by medjax.train_lib)."""
