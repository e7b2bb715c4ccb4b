"""Checkpoint folders: converted weights (Orbax) plus the model configuration as JSON."""
