"""Former home of the Hugging Face loader and ``grow_vocab``; re-exports them where they live now.

``from_hf``: :func:`mmret.models.from_hf` (which dispatches on config.json's ``model_type``; the loader
itself is :mod:`mmret.convert.load`). ``grow_vocab`` / ``mean_resized_rows``: :mod:`mmret.models.vocab`.
``flat_params``: :mod:`mmret.models.params`. The embedding and LM-head paths: the backbone spec
(:data:`mmret.models.qwen2_vl.backbone.BACKBONE`).
"""

from __future__ import annotations

from mmret.models.load import from_hf
from mmret.models.params import flat_params
from mmret.models.qwen2_vl.backbone import BACKBONE
from mmret.models.vocab import grow_vocab, mean_resized_rows

#: Where the token embedding [vocab, hidden] and an untied LM head's kernel [hidden, vocab] live.
EMBED_PATH: tuple[str, ...] = BACKBONE.embed_path
LM_HEAD_PATH: tuple[str, ...] = BACKBONE.lm_head_path

__all__ = ["EMBED_PATH", "LM_HEAD_PATH", "flat_params", "from_hf", "grow_vocab", "mean_resized_rows"]
