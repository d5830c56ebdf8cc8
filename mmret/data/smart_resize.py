"""Qwen2-VL "smart resize": the image size the vision tower sees.

Each side is rounded to a multiple of ``factor`` (patch 14 x merge 2 = 28, one visual token per 28x28
pixels); if that area exceeds ``max_pixels`` both sides are scaled down by the same factor (rounded down),
if it falls below ``min_pixels`` they are scaled up (rounded up). Aspect ratios above 200 are refused, as
in Hugging Face's ``Qwen2VLImageProcessor``. The rounding uses Python's ``round`` (ties to even), which is
what Hugging Face uses, so sizes agree exactly.
"""

from __future__ import annotations

import math

#: Largest accepted ``max(h, w) / min(h, w)`` (Hugging Face raises above it).
MAX_ASPECT_RATIO = 200

#: U-MARVEL's image cap: at most 300 visual tokens.
UMARVEL_MAX_PIXELS = 300 * 28 * 28
#: Qwen2-VL's default lower bound (``preprocessor_config.json`` of the released checkpoints).
QWEN2VL_MIN_PIXELS = 56 * 56


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = 28,
    min_pixels: int = QWEN2VL_MIN_PIXELS,
    max_pixels: int = UMARVEL_MAX_PIXELS,
) -> tuple[int, int]:
    """The (height, width) a ``height`` x ``width`` image is resized to; both multiples of ``factor``.

    Raises ``ValueError`` for an empty image, an aspect ratio above :data:`MAX_ASPECT_RATIO`, or
    ``min_pixels > max_pixels``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image has no pixels: {height}x{width}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) > max_pixels ({max_pixels})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"image {height}x{width}: aspect ratio {ratio:.1f} above {MAX_ASPECT_RATIO}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def num_image_tokens(
    height: int,
    width: int,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    min_pixels: int = QWEN2VL_MIN_PIXELS,
    max_pixels: int = UMARVEL_MAX_PIXELS,
) -> int:
    """How many ``<|image_pad|>`` tokens a still ``height`` x ``width`` image becomes."""
    factor = patch_size * merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // factor) * (w // factor)
