"""The bi-encoder retriever as one module: the encoder (backbone + pooling) and the InfoNCE temperature."""

from __future__ import annotations

from flax import nnx

from mmret.losses import Temperature
from mmret.models.encoder import Encoder


class Retriever(nnx.Module):
    """What a bi-encoder run trains and checkpoints (parameter paths ``encoder.backbone...`` and
    ``temperature.log_tau``)."""

    def __init__(self, encoder: Encoder, temperature: Temperature):
        self.encoder = encoder
        self.temperature = temperature
