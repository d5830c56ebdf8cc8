"""Training: the contrastive step (plain or GradCache), GradCache itself, and the trainer loop."""
