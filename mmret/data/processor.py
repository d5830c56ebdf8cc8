"""Input processing for retrieval: a query or a candidate -> token ids, image patches, masks.

``Processor(model_dir, ProcessorConfig(...))(text=..., image=..., instruction=...)`` renders the input
under a template (:mod:`mmret.data.templates`), tokenises it with the directory's tokenizer, turns the
image into patches and returns a :class:`ProcessedExample` of numpy arrays. Numpy and PIL only per
example (it runs in data-loading workers); no torch, no transformers call per example.

The backbone (:mod:`mmret.models.registry`) is the one the directory's ``config.json`` names by its
``model_type`` (the default, Qwen2-VL's, for a directory of tokenizer and processor files alone, or the
``model_type`` argument); it gives the M-RoPE position-id function, the special tokens (image pad, pad)
and the image patching defaults that ``preprocessor_config.json`` does not set.

Equal to Hugging Face on the same inputs: the token ids are those of the tokenizer on the rendered string
with ``<|image_pad|>`` expanded, and ``pixel_values`` / ``image_grid_thw`` are bit-identical to the PIL
``Qwen2VLImageProcessor`` (same PIL bicubic resize on uint8, then a per-channel lookup table holding
exactly Hugging Face's float32 rescale-and-normalise of each of the 256 byte values). One deliberate
difference: instruction and text are taken literally, so a special-token string inside them (say
``"<|image_pad|>"``) stays plain text instead of becoming that token.

Added tokens: a template may need tokens the tokenizer lacks (``umarvel_exact``: ``<emb>``,
``<instruction_start>``, ``<instruction_end>``). The processor adds the missing ones to its private copy of
the tokenizer as U-MARVEL does (``add_tokens``: not special, so, as in Hugging Face, the same string inside
free text also becomes the token), at ids ``len(tokenizer)``, ``+1``, ... in the template's order;
``added_tokens`` lists them and ``vocab_size`` is the tokenizer's size with them (the rows the model's
token embedding must have: see ``mmret.models.vocab.grow_vocab``).

Train and evaluation forms: ``for_eval=True`` renders the evaluation form of templates that have one
(``umarvel_exact``: U-MARVEL's evaluation adds the generation prompt and words an image-only candidate as
"image and sentence"); the evaluation pipelines pass it, training does not.

Pool mask (which tokens enter mean pooling): with ``pool_scope="sequence"`` (the default, U-MARVEL's
"mean over the sequence without the instruction") every token except the instruction and its two
markers, template scaffolding included; with ``"content"`` only the image tokens and the free text (a
token that straddles the end of the text, like ``".\n"`` before the summary suffix, counts as text).
The ``last_token`` template always pools its last token alone (the appended ``<|endoftext|>``), so mean
pooling under the mask is last-token pooling.

Truncation: ``max_text_tokens`` caps the free text; ``max_length`` caps the whole sequence by shortening
the free text first, then the instruction. Image tokens and the template are never cut (an input whose
image and template alone exceed ``max_length`` is an error). A shortened text is a prefix of the text cut
at a token boundary, re-rendered and re-tokenised, so ids stay those of the tokenizer on the rendered
(shortened) prompt.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from mmret.data.smart_resize import UMARVEL_MAX_PIXELS, smart_resize
from mmret.data.templates import TEXT_KINDS, Piece, TemplateName, TemplateSpec, render_string
from mmret.data.tokenizer_cache import cached_backend
from mmret.models import registry
from mmret.models.backbone import Backbone

if TYPE_CHECKING:
    import tokenizers

ImageInput = Image.Image | np.ndarray
PoolScope = Literal["sequence", "content"]
PaddingSide = Literal["left", "right"]

#: Pool-mask membership per piece kind and scope.
_POOLED_KINDS: dict[str, frozenset[str]] = {
    "sequence": frozenset({"special", "image", "embed", "scaffold", "text"}),
    "content": frozenset({"image", "text"}),
}


#: Hugging Face tokenizers loaded in this process: (directory, its files' sizes and mtimes) -> (the backend's
#: JSON, pad id). Loading one takes about a second; a chain of stages and the evaluations opens the same
#: directory many times, and a processor keeps only its own copy of the backend.
_TOKENIZERS: dict[tuple[Any, ...], tuple[str, int | None]] = {}


def _backend_of(tokenizer: Any) -> tuple[str, int | None]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"need a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    return backend.to_str(), tokenizer.pad_token_id


#: Encoders built in this process: (backend JSON, the template's added tokens) -> (the encoder, the tokens it
#: added). Parsing the backend takes about half a second; processors of one tokenizer and template share one
#: encoder, which nothing changes once built (encoding is read-only and thread-safe in tokenizers).
_ENCODERS: dict[tuple[str, tuple[str, ...]], tuple[tokenizers.Tokenizer, tuple[str, ...]]] = {}


def _encoder_of(backend_json: str, added_tokens: tuple[str, ...]) -> tuple[tokenizers.Tokenizer, tuple[str, ...]]:
    """A copy of the backend that reads special-token strings inside free text literally, with the template's
    ``added_tokens`` that it lacks added one at a time (as U-MARVEL's loader: ids follow in this order)."""
    key = (backend_json, added_tokens)
    if key not in _ENCODERS:
        from tokenizers import Tokenizer

        encoder = Tokenizer.from_str(backend_json)
        encoder.encode_special_tokens = True
        encoder.no_truncation()
        encoder.no_padding()
        known = {t.content for t in encoder.get_added_tokens_decoder().values()}
        missing = [t for t in added_tokens if t not in known]
        for token in missing:
            encoder.add_tokens([token])
        _ENCODERS[key] = (encoder, tuple(missing))
    return _ENCODERS[key]


def _auto_backend(model_dir: Path) -> tuple[str, int | None]:
    from transformers import AutoTokenizer

    return _backend_of(AutoTokenizer.from_pretrained(str(model_dir)))


def _tokenizer_of(model_dir: Path) -> tuple[str, int | None]:
    """``AutoTokenizer.from_pretrained(model_dir)``'s backend and pad id, loaded once per process while the
    directory's files stay as they are, and kept on disk between processes (:mod:`mmret.data.tokenizer_cache`)."""
    stamps = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(model_dir.iterdir()) if p.is_file())
    key = (str(model_dir.resolve()), stamps)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = cached_backend(model_dir, _auto_backend)
    return _TOKENIZERS[key]


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    """How inputs are rendered, truncated and resized.

    ``template`` is a :class:`TemplateSpec` or just its name. ``min_pixels`` / ``max_pixels`` bound the
    resized image area (None: the model directory's ``preprocessor_config.json`` value; the default cap
    is U-MARVEL's 300*28*28, at most 300 image tokens). ``max_text_tokens`` caps the free text,
    ``max_length`` the whole sequence (None: no cap).
    """

    template: TemplateSpec | TemplateName = "umarvel"
    min_pixels: int | None = None
    max_pixels: int | None = UMARVEL_MAX_PIXELS
    max_text_tokens: int | None = 480
    max_length: int | None = None
    pool_scope: PoolScope = "sequence"

    def template_spec(self) -> TemplateSpec:
        """The template as a :class:`TemplateSpec`."""
        return self.template if isinstance(self.template, TemplateSpec) else TemplateSpec(name=self.template)


@dataclasses.dataclass(frozen=True)
class ProcessedExample:
    """One rendered input. Arrays are numpy; ``L`` is the unpadded length, ``N`` the number of patches."""

    input_ids: np.ndarray  # [L] int32
    attention_mask: np.ndarray  # [L] int32, all ones
    pool_mask: np.ndarray  # [L] int32, 1 = enters the pooled embedding
    position_ids: np.ndarray  # [3, L] int32, M-RoPE (t, h, w)
    pixel_values: np.ndarray | None  # [N, 3 * temporal_patch * patch**2] float32
    image_grid_thw: np.ndarray | None  # [1, 3] int32
    num_text_tokens: int  # free-text tokens kept
    num_instruction_tokens: int  # instruction tokens kept (markers not counted)
    num_image_tokens: int
    truncated: bool  # whether text or instruction was shortened

    @property
    def length(self) -> int:
        """Number of tokens."""
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        """Number of patch rows in ``pixel_values`` (0 without an image)."""
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


@dataclasses.dataclass(frozen=True)
class _Tokens:
    ids: np.ndarray  # [L] int32, image placeholder expanded
    kinds: list[str]  # kind per token before expansion (one "image" entry)
    text_starts: list[int]  # char start (in the text piece) of each free-text token
    instruction_starts: list[int]  # same for the instruction piece


class ImagePatcher:
    """Image preprocessing of the Qwen-VL families: RGB, smart resize (PIL bicubic), rescale + normalise,
    patchify (the defaults are Qwen2-VL's; :meth:`for_backbone` takes a backbone's).

    Rows come out in Hugging Face's order: 2x2 merge blocks in row-major block order, row-major inside a
    block; each row is (channel, temporal, patch row, patch column), the still image repeated over the
    temporal patch.
    """

    def __init__(
        self,
        *,
        min_pixels: int,
        max_pixels: int,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        image_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
        rescale_factor: float = 1 / 255,
    ) -> None:
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        # Hugging Face: float32(float64(byte) * rescale_factor), then (x - mean) / std in float32.
        scaled = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
        mean = np.asarray(image_mean, dtype=np.float32)[:, None]
        std = np.asarray(image_std, dtype=np.float32)[:, None]
        self._lut = (scaled[None, :] - mean) / std  # [3, 256] float32

    @classmethod
    def for_backbone(
        cls, backbone: Backbone, preprocessor: dict[str, Any] | None = None, **overrides: Any
    ) -> ImagePatcher:
        """The patcher of ``backbone``'s image settings, with what a ``preprocessor_config.json`` dict sets
        taking precedence, and ``overrides`` (e.g. ``min_pixels`` / ``max_pixels``; None: not given) last."""
        pre = preprocessor or {}
        size = pre.get("size") or {}
        d = backbone.patching
        settings: dict[str, Any] = {
            "min_pixels": pre.get("min_pixels") or size.get("shortest_edge") or d.min_pixels,
            "max_pixels": pre.get("max_pixels") or size.get("longest_edge") or d.max_pixels,
            "patch_size": pre.get("patch_size", d.patch_size),
            "temporal_patch_size": pre.get("temporal_patch_size", d.temporal_patch_size),
            "merge_size": pre.get("merge_size", d.merge_size),
            "image_mean": pre.get("image_mean", d.image_mean),
            "image_std": pre.get("image_std", d.image_std),
            "rescale_factor": pre.get("rescale_factor", d.rescale_factor),
        }
        settings.update({k: v for k, v in overrides.items() if v})
        ints = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size")
        return cls(
            **{k: int(v) if k in ints else v for k, v in settings.items() if k != "rescale_factor"},
            rescale_factor=float(settings["rescale_factor"]),
        )

    @property
    def max_patches(self) -> int:
        """The most patch rows one image can have (the resize keeps its area within ``max_pixels``)."""
        return self.max_pixels // self.patch_size**2

    @property
    def patch_dim(self) -> int:
        """Values per patch row (3 * temporal_patch * patch**2 = 1176 for Qwen2-VL)."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The resized (height, width) of a ``height`` x ``width`` image."""
        factor = self.patch_size * self.merge_size
        return smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def __call__(self, image: ImageInput) -> tuple[np.ndarray, np.ndarray]:
        """``(pixel_values [N, patch_dim] float32, image_grid_thw [1, 3] int32)`` for one still image."""
        rgb = to_rgb(image)
        height, width = self.target_size(rgb.height, rgb.width)
        if (width, height) != rgb.size:
            rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(rgb)  # [H, W, 3] uint8
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = height // p, width // p
        blocks = pixels.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
        blocks = np.ascontiguousarray(blocks).reshape(gh * gw, 3, p * p)
        out = np.empty((gh * gw, 3, t, p * p), dtype=np.float32)
        for c in range(3):
            out[:, c, 0] = np.take(self._lut[c], blocks[:, c])
        out[:, :, 1:] = out[:, :, :1]
        return out.reshape(gh * gw, self.patch_dim), np.array([[1, gh, gw]], dtype=np.int32)


def to_rgb(image: ImageInput) -> Image.Image:
    """An RGB PIL image; transparency is composited onto white (as Hugging Face does)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(
                f"image array must be uint8 [H, W], [H, W, 3] or [H, W, 4]; got {image.dtype} {list(image.shape)}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


class Processor:
    """Renders queries and candidates into retrieval inputs (see the module docstring).

    ``tokenizer`` may pass an already loaded Hugging Face fast tokenizer; otherwise it is loaded with
    ``AutoTokenizer.from_pretrained(model_dir)``. Image settings come from the directory's
    ``preprocessor_config.json`` (min/max pixels overridable in the config), then the backbone's defaults.
    ``model_type`` names the backbone (default: the directory's config.json, else
    :data:`mmret.models.registry.DEFAULT_MODEL_TYPE`).
    """

    def __init__(
        self,
        model_dir: str | Path,
        config: ProcessorConfig | None = None,
        *,
        tokenizer: Any = None,
        model_type: str | None = None,
    ) -> None:
        self.config = config if config is not None else ProcessorConfig()
        self.template = self.config.template_spec()
        if self.config.pool_scope not in _POOLED_KINDS:
            raise ValueError(f"pool_scope must be one of {list(_POOLED_KINDS)}, got {self.config.pool_scope!r}")
        for name in ("max_text_tokens", "max_length"):
            value = getattr(self.config, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        model_dir = Path(model_dir)
        if tokenizer is None:
            if not model_dir.is_dir():  # else transformers takes the path for a hub repo id
                if model_dir.exists():
                    raise NotADirectoryError(f"{model_dir}: not a directory (of the tokenizer and processor files)")
                raise FileNotFoundError(f"{model_dir}: no such directory (of the tokenizer and processor files)")
        backend_json, pad = _tokenizer_of(model_dir) if tokenizer is None else _backend_of(tokenizer)
        self.backbone: Backbone = (
            registry.get(model_type)
            if model_type is not None
            else registry.backbone_of(model_dir, default=registry.DEFAULT_MODEL_TYPE)
        )
        self.template = self.template.with_default_system(self.backbone.default_system_prompt)
        tokens = self.backbone.tokens
        self._encoder, self.added_tokens = _encoder_of(backend_json, tuple(self.template.added_tokens()))
        self.vocab_size: int = self._encoder.get_vocab_size(with_added_tokens=True)
        added = {t.content: i for i, t in self._encoder.get_added_tokens_decoder().items()}
        self._special_ids: dict[str, int] = {}
        for token in self.template.special_tokens():
            if token not in added:
                raise ValueError(
                    f"template token {token!r} is not a special token of the tokenizer in {model_dir}; "
                    "pick one of its existing special tokens (no embedding resize)"
                )
            self._special_ids[token] = added[token]
        for token in (tokens.image_pad, *([tokens.pad] if pad is None else [])):
            if token.text not in added:
                raise ValueError(f"the tokenizer in {model_dir} lacks {self.backbone.name}'s {token.text!r} token")
        self.image_token_id: int = added[tokens.image_pad.text]
        self.pad_token_id = int(pad) if pad is not None else added[tokens.pad.text]
        self._scaffold_cache: dict[str, list[int]] = {}

        pre = json.loads((model_dir / "preprocessor_config.json").read_text(encoding="utf-8"))
        self.patcher = ImagePatcher.for_backbone(
            self.backbone, pre, min_pixels=self.config.min_pixels, max_pixels=self.config.max_pixels
        )

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of ``ids`` (special tokens kept)."""
        return self._encoder.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` read literally (a special-token string inside it stays plain text)."""
        return self._encoder.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int:
        """The id of a special (added) token of the tokenizer; ``ValueError`` when it has none."""
        found = self._encoder.token_to_id(token)
        if found is None or token not in {t.content for t in self._encoder.get_added_tokens_decoder().values()}:
            raise ValueError(f"the tokenizer has no special token {token!r}")
        return int(found)

    def render(
        self,
        text: str | None = None,
        *,
        instruction: str | None = None,
        has_image: bool = False,
        for_eval: bool = False,
    ) -> str:
        """The prompt string for these inputs, one ``<|image_pad|>`` standing for the image (no truncation)."""
        return render_string(
            self.template.render(
                instruction=instruction or None,
                text=text or None,
                has_image=has_image,
                has_text=bool(text),
                for_eval=for_eval,
            )
        )

    def __call__(
        self,
        text: str | None = None,
        image: ImageInput | None = None,
        *,
        instruction: str | None = None,
        for_eval: bool = False,
    ) -> ProcessedExample:
        """Process one query (give ``instruction``) or candidate (no instruction); empty strings count as absent.
        ``for_eval``: the template's evaluation form (see the module docstring)."""
        text, instruction = text or None, instruction or None
        if text is None and image is None:
            raise ValueError("an input needs text or an image")
        pixel_values = grid = None
        n_image = 0
        if image is not None:
            pixel_values, grid = self.patcher(image)
            n_image = int(np.prod(grid)) // self.patcher.merge_size**2
        has_text = text is not None
        truncated = False
        while True:
            pieces = self.template.render(
                instruction=instruction, text=text, has_image=image is not None, has_text=has_text, for_eval=for_eval
            )
            tokens = self._tokenize(pieces, n_image)
            n_text, n_instr = len(tokens.text_starts), len(tokens.instruction_starts)
            over_text = n_text - self.config.max_text_tokens if self.config.max_text_tokens is not None else 0
            over_total = len(tokens.ids) - self.config.max_length if self.config.max_length is not None else 0
            if over_text <= 0 and over_total <= 0:
                break
            truncated = True
            if n_text > 0:
                lead = 1 if instruction else 0  # the space the template puts between instruction and text
                keep = n_text - max(over_text, over_total, 1)
                text = _cut(_piece(pieces, "text"), lead, tokens.text_starts, keep)
            elif n_instr > 0:
                keep = n_instr - max(over_total, 1)
                instruction = _cut(_piece(pieces, "instruction"), 0, tokens.instruction_starts, keep)
            else:
                raise ValueError(
                    f"input needs {len(tokens.ids)} tokens with no text or instruction left ({n_image} image "
                    f"tokens), more than max_length={self.config.max_length}"
                )
        ids = tokens.ids
        pool = self._pool_mask(tokens.kinds, n_image)
        attention = np.ones(ids.shape, dtype=np.int32)
        positions = self.backbone.position_ids(
            ids[None],
            attention[None],
            grid,
            image_token_id=self.image_token_id,
            spatial_merge_size=self.patcher.merge_size,
            xp=np,
        )[:, 0].astype(np.int32)
        return ProcessedExample(
            input_ids=ids,
            attention_mask=attention,
            pool_mask=pool,
            position_ids=positions,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            num_text_tokens=n_text,
            num_instruction_tokens=n_instr,
            num_image_tokens=n_image,
            truncated=truncated,
        )

    def collate(self, examples: Sequence[ProcessedExample], **kwargs: Any) -> dict[str, np.ndarray]:
        """:func:`collate` with this tokenizer's pad id and this patcher's patch row width."""
        kwargs.setdefault("patch_dim", self.patcher.patch_dim)
        return collate(examples, pad_token_id=self.pad_token_id, **kwargs)

    def _tokenize(self, pieces: list[Piece], n_image: int) -> _Tokens:
        """Token ids of ``pieces``: runs of text pieces tokenised together, special tokens by id."""
        ids: list[int] = []
        kinds: list[str] = []
        starts: dict[str, list[int]] = {"text": [], "instruction": []}
        image_at = -1
        i = 0
        while i < len(pieces):
            piece = pieces[i]
            if piece.kind not in TEXT_KINDS:
                if piece.kind == "image":
                    image_at = len(ids)
                ids.append(self._special_ids[piece.text])
                kinds.append(piece.kind)
                i += 1
                continue
            j = i
            while j < len(pieces) and pieces[j].kind in TEXT_KINDS:
                j += 1
            run = pieces[i:j]
            if all(p.kind == "scaffold" for p in run):
                key = "".join(p.text for p in run)
                cached = self._scaffold_cache.get(key)
                if cached is None:
                    cached = self._scaffold_cache[key] = self._encoder.encode(key, add_special_tokens=False).ids
                ids += cached
                kinds += ["scaffold"] * len(cached)
            else:
                bounds = list(itertools.accumulate((len(p.text) for p in run), initial=0))
                enc = self._encoder.encode("".join(p.text for p in run), add_special_tokens=False)
                ids += enc.ids
                for start, _ in enc.offsets:
                    k = bisect.bisect_right(bounds, start) - 1
                    kind = run[k].kind
                    kinds.append(kind)
                    if kind in starts:
                        starts[kind].append(start - bounds[k])
            i = j
        arr = np.asarray(ids, dtype=np.int32)
        if image_at >= 0:
            arr = np.concatenate([arr[:image_at], np.full(n_image, self.image_token_id, np.int32), arr[image_at + 1 :]])
        return _Tokens(arr, kinds, starts["text"], starts["instruction"])

    def _pool_mask(self, kinds: list[str], n_image: int) -> np.ndarray:
        """[L] int32 pool mask for token ``kinds`` (image placeholder expanded to ``n_image``)."""
        if self.template.name == "last_token":
            length = len(kinds) - 1 + n_image if "image" in kinds else len(kinds)
            mask = np.zeros(length, dtype=np.int32)
            mask[-1] = 1
            return mask
        pooled = _POOLED_KINDS[self.config.pool_scope]
        per_kind = [(n_image if kind == "image" else 1, int(kind in pooled)) for kind in kinds]
        counts, values = zip(*per_kind, strict=True)
        return np.repeat(np.asarray(values, dtype=np.int32), counts)


def _piece(pieces: list[Piece], kind: str) -> str:
    """The string of the (single) piece of ``kind``."""
    return next(p.text for p in pieces if p.kind == kind)


def _cut(rendered: str, lead: int, starts: list[int], keep: int) -> str | None:
    """The input string behind ``rendered`` (its piece, ``lead`` template characters first) cut to its first
    ``keep`` tokens (``starts``: each token's start in ``rendered``); None when nothing is left.
    """
    cut = starts[keep] if keep > 0 else 0
    return rendered[lead:cut].rstrip() or None


def collate(
    examples: Sequence[ProcessedExample],
    *,
    max_length: int,
    max_patches: int,
    max_images: int | None = None,
    padding_side: PaddingSide = "right",
    pad_token_id: int = 151643,
    pixel_dtype: Any = np.float32,
    patch_dim: int = 3 * 2 * 14 * 14,
) -> dict[str, np.ndarray]:
    """Pad ``examples`` into one batch of fixed shapes.

    Returns ``input_ids``, ``attention_mask``, ``pool_mask`` [B, max_length] int32; ``position_ids``
    [3, B, max_length] int32 (pads 0: M-RoPE ids do not depend on padding); ``pixel_values``
    [max_patches, patch_dim] (the examples' patch rows in batch order, then zero rows) with ``patch_mask``
    [max_patches] int32; ``image_grid_thw`` [max_images, 3] int32 (one row per image in batch order, then a
    filler row (1, 2, padding/2) covering the padding patch rows, then zero rows) with ``image_mask``
    [max_images] int32 (1 for real images); ``lengths`` [B] int32; ``text_tokens`` [B] int32
    (free-text plus instruction tokens: 0 for an image-only candidate). ``max_images`` defaults to the
    batch size + 1 (room for the filler); ``patch_dim`` is the width of ``pixel_values`` when no example has
    an image (else the examples'). Raises ``ValueError`` when an example or the batch does not fit.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    batch = len(examples)
    input_ids = np.full((batch, max_length), pad_token_id, dtype=np.int32)
    attention = np.zeros((batch, max_length), dtype=np.int32)
    pool = np.zeros((batch, max_length), dtype=np.int32)
    positions = np.zeros((3, batch, max_length), dtype=np.int32)
    lengths = np.zeros(batch, dtype=np.int32)
    images = collate_images(
        examples,
        max_patches=max_patches,
        max_images=batch + 1 if max_images is None else max_images,
        pixel_dtype=pixel_dtype,
        patch_dim=patch_dim,
    )
    for b, ex in enumerate(examples):
        n = ex.length
        if n > max_length:
            raise ValueError(f"example {b} has {n} tokens, more than max_length={max_length}")
        span = slice(max_length - n, max_length) if padding_side == "left" else slice(0, n)
        input_ids[b, span] = ex.input_ids
        attention[b, span] = ex.attention_mask
        pool[b, span] = ex.pool_mask
        positions[:, b, span] = ex.position_ids
        lengths[b] = n
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "pool_mask": pool,
        "position_ids": positions,
        **images,
        "lengths": lengths,
        "text_tokens": text_tokens(examples),
    }


def text_tokens(examples: Sequence[ProcessedExample]) -> np.ndarray:
    """[B] int32 free-text plus instruction tokens per example (0: an image-only input)."""
    return np.array([ex.num_text_tokens + ex.num_instruction_tokens for ex in examples], np.int32)


def collate_images(
    examples: Sequence[ProcessedExample],
    *,
    max_patches: int,
    max_images: int,
    pixel_dtype: Any = np.float32,
    patch_dim: int = 3 * 2 * 14 * 14,
) -> dict[str, np.ndarray]:
    """The image part of a batch, the examples' images in the order given (the order their image tokens
    come in the batch's rows): ``pixel_values`` [max_patches, patch_dim], ``patch_mask`` [max_patches],
    ``image_grid_thw`` [max_images, 3] with the filler row covering the padding patches, ``image_mask``
    [max_images] (see :func:`collate`)."""
    if max_patches % 4:
        raise ValueError(f"max_patches={max_patches} must be a multiple of 4 (the 2x2 patch merger)")
    pixels = [ex.pixel_values for ex in examples if ex.pixel_values is not None]
    grids = [ex.image_grid_thw for ex in examples if ex.image_grid_thw is not None]
    n_patches = sum(p.shape[0] for p in pixels)
    n_images = sum(g.shape[0] for g in grids)
    if n_patches > max_patches:
        raise ValueError(f"batch has {n_patches} image patches, more than max_patches={max_patches}")
    if n_images > max_images:
        raise ValueError(f"batch has {n_images} images, more than max_images={max_images}")
    patch_dim = pixels[0].shape[1] if pixels else patch_dim
    pixel_values = np.zeros((max_patches, patch_dim), dtype=pixel_dtype)
    if pixels:
        pixel_values[:n_patches] = np.concatenate(pixels)
    patch_mask = (np.arange(max_patches) < n_patches).astype(np.int32)
    image_grid_thw = np.zeros((max_images, 3), dtype=np.int32)
    if grids:
        image_grid_thw[:n_images] = np.concatenate(grids)
    if n_patches < max_patches:  # a filler "image" covers the padding rows, so patch blocks stay aligned
        if n_images >= max_images:
            raise ValueError(f"batch has {n_images} images and padding patches: max_images must be > {n_images}")
        image_grid_thw[n_images] = (1, 2, (max_patches - n_patches) // 2)
    image_mask = (np.arange(max_images) < n_images).astype(np.int32)
    return {
        "pixel_values": pixel_values,
        "patch_mask": patch_mask,
        "image_grid_thw": image_grid_thw,
        "image_mask": image_mask,
    }
