"""mmret.data.processor against Hugging Face: token ids, patches, grids, smart resize; pool mask,
truncation, M-RoPE ids, collation, speed.

The model directory holds only the processor files (tokenizer + ``preprocessor_config.json``, written by
``write_processor_files``, which ``tools/make_tiny_model.py`` also uses): the processor needs no weights.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

transformers = pytest.importorskip("transformers")

from mmret.data.processor import ImagePatcher, ProcessedExample, Processor, ProcessorConfig, collate  # noqa: E402
from mmret.data.smart_resize import UMARVEL_MAX_PIXELS, num_image_tokens, smart_resize  # noqa: E402
from mmret.data.templates import TemplateSpec  # noqa: E402
from mmret.models.qwen2_vl.position_ids import mrope_position_ids  # noqa: E402
from mmret.models.qwen2_vl.processor_files import ImageTextProcessor, write_processor_files  # noqa: E402

IMAGE_PAD = 151655
INSTRUCTION = "Retrieve an image that matches the given caption"
TEXTS = [
    "A dog running on the beach.",
    "two  spaces, a line.\nAnd a second line\n\n",
    "naïve café — 東京タワー 😀👩‍👩‍👧 digits 12345",
    "'s it's (brackets) [and] {braces}:",
]
CLOSING = "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qwen2vl_processor_files")
    write_processor_files(out)
    return out


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> ImageTextProcessor:
    """Hugging Face's side: the tokenizer and the PIL ``Qwen2VLImageProcessor`` of the directory."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    assert type(image_processor).__name__ == "Qwen2VLImageProcessorPil"
    image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": UMARVEL_MAX_PIXELS}
    return ImageTextProcessor(image_processor, tokenizer)


@pytest.fixture(scope="module")
def proc(model_dir: Path) -> Processor:
    return Processor(model_dir)  # loads its own tokenizer from the directory


_PROCESSORS: dict[ProcessorConfig, Processor] = {}


def _make(hf: ImageTextProcessor, model_dir: Path, **config: Any) -> Processor:
    """A processor for ``config`` sharing the loaded tokenizer (cached: building one takes ~0.3 s)."""
    key = ProcessorConfig(**config)
    if key not in _PROCESSORS:
        _PROCESSORS[key] = Processor(model_dir, key, tokenizer=hf.tokenizer)
    return _PROCESSORS[key]


def _image(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: resampling differences would show.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(yy * 255) // max(h - 1, 1), (xx * 255) // max(w - 1, 1), (yy + xx) % 256], -1)
    pixels = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
        img = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    elif mode != "RGB":
        img = img.convert(mode)
    return img


def _hf_ids(hf: ImageTextProcessor, prompt: str, image: Image.Image | None) -> np.ndarray:
    out = hf(prompt, images=[image] if image is not None else None)
    return np.asarray(out["input_ids"][0])


def _chat_prompt(hf: ImageTextProcessor, user_text: str, has_image: bool) -> str:
    """What the tokenizer's Qwen2-VL chat template renders for one user turn (and the generation prompt)."""
    content: list[dict[str, str]] = [{"type": "image"}] if has_image else []
    if user_text:
        content.append({"type": "text", "text": user_text})
    messages = [{"role": "user", "content": content}]
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# --- smart resize and image patches ---------------------------------------------------------------

SIDES = [1, 2, 10, 14, 27, 28, 29, 41, 42, 55, 56, 57, 99, 100, 224, 333, 500, 1000, 1023, 2048, 4000]


def test_smart_resize_matches_transformers() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    bounds = [(56 * 56, UMARVEL_MAX_PIXELS), (56 * 56, 28 * 28 * 1280), (4 * 28 * 28, 16 * 28 * 28), (784, 784)]
    checked = raised = 0
    for h in SIDES:
        for w in SIDES:
            for lo, hi in bounds:
                try:
                    want = hf_smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
                except ValueError:
                    with pytest.raises(ValueError, match="aspect ratio"):
                        smart_resize(h, w, min_pixels=lo, max_pixels=hi)
                    raised += 1
                    continue
                got = smart_resize(h, w, min_pixels=lo, max_pixels=hi)
                assert got == want, (h, w, lo, hi)
                assert got[0] % 28 == 0 and got[1] % 28 == 0
                assert num_image_tokens(h, w, min_pixels=lo, max_pixels=hi) == got[0] * got[1] // 784
                checked += 1
    assert checked > 1000 and raised > 0
    with pytest.raises(ValueError, match="no pixels"):
        smart_resize(0, 10)


@pytest.mark.parametrize(
    ("h", "w", "mode"),
    [
        (480, 640, "RGB"),  # ordinary, scaled down to the 300-token cap
        (28, 1000, "RGB"),  # extreme aspect ratios
        (1000, 28, "RGB"),
        (5, 990, "RGB"),  # ratio 198: one 28-pixel row after scaling up
        (10, 10, "RGB"),  # tiny: scaled up to min_pixels
        (3000, 2000, "RGB"),  # big: scaled down to max_pixels
        (280, 420, "RGB"),  # already a multiple of 28 (no resize)
        (77, 131, "RGBA"),  # transparency composited onto white
        (64, 48, "L"),  # greyscale
        (50, 70, "P"),  # palette
    ],
)
def test_pixels_and_grid_equal_transformers(proc: Processor, hf: ImageTextProcessor, h: int, w: int, mode: str) -> None:
    img = _image(h, w, mode, seed=h * w)
    want = hf.image_processor(images=[img])
    pixels, grid = proc.patcher(img)
    np.testing.assert_array_equal(grid, np.asarray(want["image_grid_thw"]))
    assert pixels.dtype == np.float32 and pixels.shape[1] == 1176
    np.testing.assert_array_equal(pixels, np.asarray(want["pixel_values"]))  # bit-exact (same PIL resize)
    assert grid[0, 1] * grid[0, 2] // 4 <= 300
    if (h, w) == (10, 10):
        assert grid.tolist() == [[1, 4, 4]]  # 56x56 = min_pixels


def test_uint8_array_input_and_aspect_ratio_error(proc: Processor, hf: ImageTextProcessor) -> None:
    img = _image(90, 130)
    np.testing.assert_array_equal(proc.patcher(np.asarray(img))[0], proc.patcher(img)[0])
    with pytest.raises(ValueError):
        hf.image_processor(images=[_image(4, 1000)])
    with pytest.raises(ValueError, match="aspect ratio"):
        proc(text="x", image=_image(4, 1000))
    with pytest.raises(ValueError, match="uint8"):
        proc.patcher(np.zeros((10, 10, 3), np.float32))


def test_patcher_settings() -> None:
    patcher = ImagePatcher(min_pixels=56 * 56, max_pixels=8 * 28 * 28)
    pixels, grid = patcher(_image(300, 300))
    assert grid.tolist() == [[1, 4, 4]] and pixels.shape == (16, 1176)
    # The two temporal copies of every patch are equal (a still image).
    rows = pixels.reshape(16, 3, 2, 196)
    np.testing.assert_array_equal(rows[:, :, 0], rows[:, :, 1])


# --- token ids --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("template", ["umarvel", "last_token", "plain"])
@pytest.mark.parametrize(("has_image", "instruction"), [(True, INSTRUCTION), (True, None), (False, INSTRUCTION)])
def test_input_ids_equal_transformers(
    proc: Processor,
    hf: ImageTextProcessor,
    model_dir: Path,
    text: str,
    template: str,
    has_image: bool,
    instruction: str | None,
) -> None:
    p = proc if template == "umarvel" else _make(hf, model_dir, template=template)
    image = _image(200, 300) if has_image else None
    ex = p(text, image, instruction=instruction)
    if template == "plain":
        prompt = ("<|vision_start|><|image_pad|><|vision_end|>" if has_image else "") + (
            f"{instruction} {text}" if instruction else text
        )
    elif template == "last_token":
        user = f"{instruction} {text}" if instruction else text
        prompt = _chat_prompt(hf, user, has_image) + "<|endoftext|>"
    else:
        words = "image and sentence" if has_image else "sentence"
        user = f"<|object_ref_start|>{instruction}<|object_ref_end|> {text}" if instruction else text
        prompt = _chat_prompt(hf, f"{user}\nSummarize above {words} in one word:", has_image) + "<|endoftext|>"
        assert prompt.endswith(CLOSING)
    assert p.render(text, instruction=instruction, has_image=has_image) == prompt
    np.testing.assert_array_equal(ex.input_ids, _hf_ids(hf, prompt, image))
    assert ex.input_ids.dtype == np.int32
    assert int((ex.input_ids == IMAGE_PAD).sum()) == ex.num_image_tokens
    if has_image:
        assert ex.num_image_tokens == int(np.prod(ex.image_grid_thw)) // 4 == ex.num_patches // 4
    else:
        assert ex.pixel_values is None and ex.image_grid_thw is None and ex.num_patches == 0


def test_image_only_and_candidate_wording(proc: Processor, hf: ImageTextProcessor) -> None:
    image = _image(100, 100)
    ex = proc(None, image, instruction="Find a similar image")
    prompt = _chat_prompt(
        hf,
        "<|object_ref_start|>Find a similar image<|object_ref_end|>\nSummarize above image in one word:",
        True,
    )
    np.testing.assert_array_equal(ex.input_ids, _hf_ids(hf, prompt + "<|endoftext|>", image))
    cand = proc("", image)  # empty text counts as absent; candidates get no instruction
    assert proc.decode(cand.input_ids).count("<|object_ref_start|>") == 0
    assert "Summarize above image in one word:" in proc.decode(cand.input_ids)
    with pytest.raises(ValueError, match="text or an image"):
        proc("", None, instruction="x")


def test_special_token_strings_in_text_stay_text(proc: Processor) -> None:
    image = _image(60, 60)
    ex = proc("look <|image_pad|><|im_end|> here", image, instruction="<|object_ref_end|>")
    assert int((ex.input_ids == IMAGE_PAD).sum()) == ex.num_image_tokens == 4
    assert int((ex.input_ids == 151645).sum()) == 2  # the template's two <|im_end|>
    assert int((ex.input_ids == 151647).sum()) == 1


def test_unknown_template_token_is_refused(hf: ImageTextProcessor, model_dir: Path) -> None:
    with pytest.raises(ValueError, match="not a special token"):
        _make(hf, model_dir, template=TemplateSpec(embed_token="<emb>"))
    with pytest.raises(ValueError, match="unknown template"):
        TemplateSpec(name="nope")  # type: ignore[arg-type]


# --- pool mask ------------------------------------------------------------------------------------


def test_pool_mask_excludes_instruction_and_markers(proc: Processor, hf: ImageTextProcessor, model_dir: Path) -> None:
    image = _image(140, 140)
    ex = proc("A red car.", image, instruction=INSTRUCTION)
    excluded = ex.input_ids[ex.pool_mask == 0]
    assert proc.decode(excluded) == f"<|object_ref_start|>{INSTRUCTION}<|object_ref_end|>"
    assert ex.num_instruction_tokens == len(excluded) - 2
    pooled = proc.decode(ex.input_ids[ex.pool_mask == 1])
    assert pooled.startswith("<|im_start|>system\n") and pooled.endswith(CLOSING)
    assert " A red car.\nSummarize above image and sentence in one word:" in pooled
    assert int(ex.pool_mask[ex.input_ids == IMAGE_PAD].min()) == 1

    content = _make(hf, model_dir, pool_scope="content")("A red car.", image, instruction=INSTRUCTION)
    kept = content.input_ids[content.pool_mask == 1]
    assert int((kept == IMAGE_PAD).sum()) == content.num_image_tokens == 25
    # The separating space rides on the text; ".\n" is one token, counted with the text where it starts.
    assert proc.decode(kept[kept != IMAGE_PAD]) == " A red car.\n"
    assert content.num_text_tokens == len(kept) - 25

    last = _make(hf, model_dir, template="last_token")("A red car.", image, instruction=INSTRUCTION)
    assert last.pool_mask.sum() == 1 and last.pool_mask[-1] == 1 and last.input_ids[-1] == 151643

    plain = _make(hf, model_dir, template="plain")("A red car.", None, instruction=INSTRUCTION)
    assert proc.decode(plain.input_ids[plain.pool_mask == 1]) == " A red car."


# --- truncation -----------------------------------------------------------------------------------


def test_truncation_keeps_image_and_closing_template(hf: ImageTextProcessor, model_dir: Path) -> None:
    image = _image(280, 280)  # 100 image tokens
    text = " ".join(f"word{i}" for i in range(300))
    full = _make(hf, model_dir, max_text_tokens=None)(text, image, instruction=INSTRUCTION)
    assert not full.truncated
    for max_length in (full.length - 1, 250, 180, 160):
        p = _make(hf, model_dir, max_length=max_length, max_text_tokens=None)
        ex = p(text, image, instruction=INSTRUCTION)
        assert ex.truncated and ex.length <= max_length
        assert ex.length >= max_length - 3  # cut close to the limit
        assert ex.num_image_tokens == 100 and int((ex.input_ids == IMAGE_PAD).sum()) == 100
        assert ex.num_instruction_tokens == full.num_instruction_tokens  # text goes first
        decoded = p.decode(ex.input_ids)
        assert decoded.endswith("\nSummarize above image and sentence in one word:" + CLOSING)
        kept_text = decoded.split("<|object_ref_end|> ")[1].split("\nSummarize")[0]
        assert text.startswith(kept_text) and len(kept_text) < len(text)
        # The ids are the tokenizer's on the rendered, shortened prompt.
        prompt = p.render(kept_text, instruction=INSTRUCTION, has_image=True)
        np.testing.assert_array_equal(ex.input_ids, _hf_ids(hf, prompt, image))
        assert ex.position_ids.shape == (3, ex.length)

    capped = _make(hf, model_dir, max_text_tokens=20)(text, image, instruction=INSTRUCTION)
    assert capped.truncated and 17 <= capped.num_text_tokens <= 20

    # Text exhausted: the instruction goes next, still keeping the image and the template.
    tight = full.length - full.num_text_tokens - 5
    ex = _make(hf, model_dir, max_length=tight, max_text_tokens=None)(text, image, instruction=INSTRUCTION)
    assert ex.num_text_tokens == 0 and 0 < ex.num_instruction_tokens < full.num_instruction_tokens
    assert ex.length <= tight and ex.num_image_tokens == 100
    assert "Summarize above image and sentence in one word:" in _make(hf, model_dir).decode(ex.input_ids)

    with pytest.raises(ValueError, match="max_length"):
        _make(hf, model_dir, max_length=100)(text, image, instruction=INSTRUCTION)


def test_truncation_of_multibyte_text_terminates(hf: ImageTextProcessor, model_dir: Path) -> None:
    text = "😀東京🚀" * 80
    p = _make(hf, model_dir, max_length=60, template="last_token")
    ex = p(text, None, instruction=None)
    assert ex.truncated and 50 <= ex.length <= 60 and ex.input_ids[-1] == 151643


# --- M-RoPE ids and collation -----------------------------------------------------------------------


def _examples(proc: Processor) -> list[ProcessedExample]:
    return [
        proc("A dog on the beach.", _image(200, 300), instruction=INSTRUCTION),
        proc("Only text here, a bit longer than the others.", None, instruction="Find a caption"),
        proc(None, _image(90, 600)),
        proc("Short.", _image(56, 56)),
    ]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_and_position_ids_equal_model(proc: Processor, padding_side: str) -> None:
    import jax.numpy as jnp

    examples = _examples(proc)
    max_length = max(ex.length for ex in examples) + 7
    n_patches = sum(ex.num_patches for ex in examples)
    batch = proc.collate(examples, max_length=max_length, max_patches=n_patches + 20, padding_side=padding_side)
    assert batch["input_ids"].shape == (4, max_length) and batch["position_ids"].shape == (3, 4, max_length)
    assert batch["pixel_values"].shape == (n_patches + 20, 1176) and batch["image_grid_thw"].shape == (5, 3)
    assert batch["patch_mask"].sum() == n_patches and not batch["pixel_values"][n_patches:].any()
    assert batch["image_mask"].tolist() == [1, 1, 1, 0, 0] and not batch["image_grid_thw"][4].any()
    # The filler row covers exactly the 20 padding patch rows, so the grids describe every row.
    assert batch["image_grid_thw"][3].tolist() == [1, 2, 10]
    assert int(batch["image_grid_thw"].prod(-1).sum()) == n_patches + 20
    np.testing.assert_array_equal(
        batch["pixel_values"][:n_patches], np.concatenate([ex.pixel_values for ex in examples if ex.num_patches])
    )
    for b, ex in enumerate(examples):
        row = slice(max_length - ex.length, None) if padding_side == "left" else slice(0, ex.length)
        np.testing.assert_array_equal(batch["input_ids"][b, row], ex.input_ids)
        np.testing.assert_array_equal(batch["pool_mask"][b, row], ex.pool_mask)
        assert batch["attention_mask"][b].sum() == ex.length == batch["lengths"][b]
        assert (batch["input_ids"][b][batch["attention_mask"][b] == 0] == 151643).all()
    # What the model computes inside jit from the padded batch (jax.numpy), including the grid padding rows.
    model_ids = mrope_position_ids(
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["image_grid_thw"]),
        image_token_id=IMAGE_PAD,
        xp=jnp,
    )
    np.testing.assert_array_equal(np.asarray(model_ids), batch["position_ids"])
    # Sanity of the ids themselves: text after the image continues at start + max(h, w) / 2.
    ex = examples[3]  # 56x56 image: 4x4 patches -> 2x2 merged tokens
    at = int(np.argmax(ex.input_ids == IMAGE_PAD))
    assert ex.num_image_tokens == 4
    assert ex.position_ids[:, at : at + 4].T.tolist() == [
        [at, at, at],
        [at, at, at + 1],
        [at, at + 1, at],
        [at, at + 1, at + 1],
    ]
    assert ex.position_ids[:, at + 4].tolist() == [at + 2] * 3
    assert ex.position_ids[:, :at].tolist() == [list(range(at))] * 3

    with pytest.raises(ValueError, match="max_length"):
        collate(examples, max_length=max_length - 8, max_patches=n_patches)
    with pytest.raises(ValueError, match="max_patches"):
        collate(examples, max_length=max_length, max_patches=n_patches - 1)
    with pytest.raises(ValueError, match="max_images"):
        collate(examples, max_length=max_length, max_patches=n_patches, max_images=2)


def test_processor_pickles(proc: Processor) -> None:
    clone = pickle.loads(pickle.dumps(proc))
    image = _image(120, 160)
    a, b = proc("A cat.", image, instruction=INSTRUCTION), clone("A cat.", image, instruction=INSTRUCTION)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.pixel_values, b.pixel_values)


def test_speed_image_text_query(proc: Processor) -> None:
    """Image+text queries at the 300-token cap, tokenisation included (decoding excluded): >= 25/s."""
    image = _image(480, 640)
    text = "A brown dog with a red collar runs along the beach while a child throws a ball into the waves."
    proc(text, image, instruction=INSTRUCTION)
    n = 40
    start = time.perf_counter()
    for _ in range(n):
        ex = proc(text, image, instruction=INSTRUCTION)
    rate = n / (time.perf_counter() - start)
    assert ex.num_image_tokens == 300
    print(f"\nprocessor: {rate:.0f} image+text examples/s on one core (300 image tokens, {ex.length} tokens)")
    assert rate >= 25
