"""Checkpoint conversion between Hugging Face (safetensors, hub key layout) and mmret."""
