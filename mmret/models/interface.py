"""What code outside a backbone's own package relies on: its config, its model and its output.

Structural types (``typing.Protocol``): a backbone satisfies them by having the attributes, it does not
subclass them. The encoder, the trainer and the checkpoint code type against these, never against a
concrete backbone class.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import jax


class BackboneConfig(Protocol):
    """A backbone's architecture plus run options (frozen; ``replace`` returns a changed copy)."""

    model_type: ClassVar[str]  # the Hugging Face config.json's model_type

    @property
    def image_token_id(self) -> int: ...

    @property
    def vision_start_token_id(self) -> int: ...

    @property
    def vision_end_token_id(self) -> int: ...

    @property
    def scan_layers(self) -> bool: ...

    @property
    def with_lm_head(self) -> bool: ...

    @property
    def dtype(self) -> Any: ...

    @property
    def param_dtype(self) -> Any: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def tie_word_embeddings(self) -> bool: ...

    def replace(self, **kwargs: Any) -> Any: ...

    def with_vocab_size(self, vocab_size: int) -> Any: ...


class BackboneOutput(Protocol):
    @property
    def last_hidden_state(self) -> jax.Array:
        """[batch, length, hidden]"""
        ...

    @property
    def logits(self) -> jax.Array | None:
        """[batch, length, vocab] when the model has its LM head, else None."""
        ...


class BackboneModel(Protocol):
    """A multimodal LLM: token ids, masks, image patches and grids in, hidden states out.

    ``pixel_values`` / ``image_grid_thw`` are the processor's patch rows and per-image grids;
    ``position_ids`` [3, batch, length] (None: computed from ``input_ids`` and the grids);
    ``image_mask`` marks the grid rows that are real images; ``causal`` overrides the attention mode;
    ``segment_ids`` [batch, length] keeps attention inside each packed example (:mod:`mmret.data.packing`).
    """

    @property
    def cfg(self) -> BackboneConfig: ...

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        image_grid_thw: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        image_mask: jax.Array | None = None,
        causal: bool | None = None,
        segment_ids: jax.Array | None = None,
    ) -> BackboneOutput: ...

    def embed_inputs(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None,
        image_grid_thw: jax.Array | None,
        image_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Token embeddings with the vision features written over the image-pad tokens."""
        ...

    def position_ids(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, image_grid_thw: jax.Array | None
    ) -> jax.Array: ...

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits [..., vocab] of final hidden states [..., hidden] (the tied embedding when tied)."""
        ...
