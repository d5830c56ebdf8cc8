"""The bi-encoder task: :mod:`.task` (what the trainer runs) and :mod:`.step` (its train step, light to import)."""
