"""Training: the contrastive step (plain or GradCache) and, later, the trainer loop."""
