"""Training: config, optimizer, checkpoints, metrics and the train loop."""
