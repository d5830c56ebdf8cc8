"""A backbone's reference implementation: the transformers (PyTorch) model its spec names.

For tools, benchmarks and parity tests; torch and transformers are imported when a function is called,
never by importing this module.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from mmret.models.backbone import Backbone


def transformers_config(spec: Backbone, config: Mapping[str, Any]) -> Any:
    """The transformers config object of a ``config.json`` dict (the class transformers registers for
    ``spec.model_type``)."""
    from transformers import CONFIG_MAPPING

    fields = copy.deepcopy(dict(config))  # transformers edits nested dicts (rope_scaling) in place
    fields.pop("model_type", None)
    return CONFIG_MAPPING[spec.model_type](**fields)


def transformers_class(spec: Backbone) -> Any:
    """The transformers model class (``spec.hf_model_class``, e.g. ``Qwen2VLForConditionalGeneration``)."""
    import transformers

    return getattr(transformers, spec.hf_model_class)


def transformers_model(spec: Backbone, config: Mapping[str, Any]) -> Any:
    """A randomly initialised transformers model of a ``config.json`` dict (seed torch first)."""
    return transformers_class(spec)(transformers_config(spec, config))
