"""The backbone spec: everything mmret needs to know about one Hugging Face multimodal LLM family.

A backbone is identified by the Hugging Face ``config.json``'s ``model_type`` (``"qwen2_vl"``). Its spec
names the config class (built from a config.json dict plus run options), the model class, the M-RoPE
position-id function the data pipeline and the model share, the image patching the processor does, the
special tokens, the architecture presets and the transformers class that is the reference
implementation. Specs are registered in :mod:`mmret.models.registry`; the conversion table (hub tensor
names <-> our parameter paths) lives beside the conversion code, keyed by the same ``model_type``
(:mod:`mmret.convert.tables`).

Pure Python at import (no jax): the processor and tools read specs in processes that never build a
model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mmret.models.interface import BackboneConfig, BackboneModel


@dataclasses.dataclass(frozen=True)
class Token:
    """A special token: its string in the tokenizer and its id in the released vocabulary."""

    text: str
    id: int


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The tokens the processor and the model treat specially."""

    image_pad: Token  # one per merged image patch; the vision features replace its embedding
    vision_start: Token
    vision_end: Token
    video_pad: Token
    pad: Token  # what batches are padded with
    eos: Token

    def ids(self) -> dict[str, int]:
        """Role -> id, e.g. ``{"image_pad": 151655, ...}``."""
        return {f.name: getattr(self, f.name).id for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class ImagePatching:
    """How an image becomes patch rows (the defaults of the family's ``preprocessor_config.json``).

    The image is resized so both sides are multiples of ``patch_size * merge_size`` and its area lies in
    ``[min_pixels, max_pixels]``, rescaled and normalised per channel, and cut into ``patch_size`` squares,
    each repeated over ``temporal_patch_size`` frames; ``merge_size`` x ``merge_size`` neighbouring patches
    become one LLM token.
    """

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int
    max_pixels: int
    rescale_factor: float = 1 / 255
    in_channels: int = 3

    @property
    def patch_dim(self) -> int:
        """Values per patch row."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


class PositionIds(Protocol):
    """``[3, batch, length]`` M-RoPE (t, h, w) ids, in the array namespace ``xp`` (numpy or jax.numpy),
    as the Hugging Face model's ``get_rope_index`` computes them for images."""

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any,
        image_grid_thw: Any | None,
        *,
        image_token_id: int,
        spatial_merge_size: int = 2,
        xp: Any = ...,
    ) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One backbone family (see the module docstring). ``create`` / ``abstract`` build its model."""

    model_type: str  # the Hugging Face config.json's model_type
    name: str  # for messages, e.g. "Qwen2-VL"
    config_class: Any  # has ``from_hf_dict(hf: dict, **options)``
    model_class: Any  # an nnx.Module built as ``model_class(config, rngs=nnx.Rngs(seed))``
    position_ids: PositionIds
    patching: ImagePatching
    tokens: SpecialTokens
    presets: tuple[str, ...]  # names :attr:`preset_config` knows
    test_presets: tuple[str, ...]  # those small enough to build with random weights (test models)
    preset_config: Callable[[str], dict[str, Any]]  # preset name -> Hugging Face config.json dict
    hf_model_class: str  # the transformers class of the reference model, e.g. "Qwen2VLForConditionalGeneration"
    embed_path: tuple[str, ...]  # our path of the token embedding [vocab, hidden]
    lm_head_path: tuple[str, ...]  # our path of an untied LM head's kernel [hidden, vocab]
    # Write the tokenizer and preprocessor files for a config.json dict into a directory (offline).
    write_processor_files: Callable[[Path, Mapping[str, Any]], list[Path]] | None = None
    # The system turn the family's chat template adds to a conversation that has none (None: it adds none);
    # prompt templates and reranker pairs render it as the chat template would.
    default_system_prompt: str | None = None

    def config(self, hf: Mapping[str, Any], **options: Any) -> BackboneConfig:
        """The config for a Hugging Face ``config.json`` dict, with run options (``dtype``,
        ``param_dtype``, ``scan_layers``, ``remat``, ``attention_impl``, ``max_image_patches``, ...)."""
        return self.config_class.from_hf_dict(dict(hf), **options)

    def create(self, config: BackboneConfig, seed: int = 0) -> BackboneModel:
        """A randomly initialised model."""
        from flax import nnx

        return self.model_class(config, rngs=nnx.Rngs(seed))

    def abstract(self, config: BackboneConfig) -> BackboneModel:
        """The model with ``jax.ShapeDtypeStruct`` leaves: nothing is allocated."""
        from flax import nnx

        return nnx.eval_shape(lambda: self.model_class(config, rngs=nnx.Rngs(0)))

    def hidden_size(self, config: BackboneConfig) -> int:
        """Width of the hidden states the model returns (what an embedding pools)."""
        return config.hidden_size
