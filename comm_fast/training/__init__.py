"""Training: the comm-fast train command, checkpoints."""
