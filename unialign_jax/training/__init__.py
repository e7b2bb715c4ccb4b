"""UniAlignment training: objectives, sharded train step, checkpoints, the training loop."""
