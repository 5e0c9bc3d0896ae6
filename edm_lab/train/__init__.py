"""Training: the Lightning module, EMA and the augmentation pipe."""
