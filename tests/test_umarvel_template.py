"""The ``umarvel_exact`` template against an independent rebuild of U-MARVEL's inputs, and the vocabulary
growth it may need (processor adds the three tokens, the backbone's embedding grows, conversion keeps both).

The rebuild follows U-MARVEL's code (``dataset/datasets_mbeir.py``: ``format_string``, ``_prepare_data_dict``,
``construct_messages``, ``CandidateDataset.get_instance``; ``loaders/qwen2_vl_7b.py``: ``add_tokens`` then
``resize_token_embeddings``; the collators: ``apply_chat_template`` with ``add_generation_prompt`` False for
training and True for evaluation, ``get_instruction_mask``), run through transformers' own tokenizer and chat
template; nothing in it comes from mmret.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import uniir_format_string as format_string  # noqa: E402
from PIL import Image

transformers = pytest.importorskip("transformers")

from mmret.data.mbeir import TASK_MODALITIES, Instructions, Query, query_text_parts  # noqa: E402
from mmret.data.processor import Processor, ProcessorConfig  # noqa: E402
from mmret.data.smart_resize import UMARVEL_MAX_PIXELS  # noqa: E402
from mmret.data.templates import TemplateSpec  # noqa: E402

ADDED = ["<emb>", "<instruction_start>", "<instruction_end>"]  # U-MARVEL's add_embed_token calls, in order
PROMPT1 = [
    "\nSummarize above image and sentence in one word: ",
    "\nSummarize above sentence in one word: ",
    "\nSummarize above image in one word: ",
]
BASE_VOCAB = 151657  # len() of the Qwen2-VL tokenizer
EXACT = ProcessorConfig(template="umarvel_exact", max_text_tokens=None)


# --- the independent rebuild ------------------------------------------------------------------------


def data_dict(txt: str, has_image: bool, *, keep_empty_text: bool = False) -> dict[str, Any]:
    """``_prepare_data_dict`` (training, queries at evaluation); ``keep_empty_text``: CandidateDataset."""
    if not has_image:
        return {"txt": txt}
    if txt == "" and not keep_empty_text:
        return {"image": "img"}
    return {"txt": txt, "image": "img"}


def messages(d: dict[str, Any]) -> list[dict[str, Any]]:
    """``construct_messages`` with ``prompt1``."""
    if "txt" in d and "image" in d:
        content = [{"type": "image", "image": d["image"]}, {"type": "text", "text": f"{d['txt']}{PROMPT1[0]}"}]
    elif "txt" in d:
        content = [{"type": "text", "text": f"{d['txt']}{PROMPT1[1]}"}]
    else:
        content = [{"type": "image", "image": d["image"]}, {"type": "text", "text": f"{PROMPT1[2]}"}]
    return [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": "<emb>."}]},
    ]


def query_dict(raw_instruction: str, raw_text: str | None, has_image: bool) -> dict[str, Any]:
    prompt = "<instruction_start>" + format_string(raw_instruction) + "<instruction_end>"
    return data_dict(format_string(f"{prompt} {raw_text or ''}"), has_image)


def candidate_dict(raw_text: str | None, has_image: bool, for_eval: bool) -> dict[str, Any]:
    return data_dict(format_string(raw_text or ""), has_image, keep_empty_text=for_eval)


def instruction_mask(ids: np.ndarray, start: int, end: int) -> np.ndarray:
    """U-MARVEL's get_instruction_mask for one row: start marker .. end marker, both included."""
    mask, inside = np.zeros_like(ids), False
    for i, t in enumerate(ids):
        if t == start:
            inside = True
        mask[i] = int(inside)
        if t == end:
            inside = False
    return mask


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(processor_dir: Path) -> Path:
    return processor_dir  # the session's processor files (tests/conftest.py): read only


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> SimpleNamespace:
    """transformers' tokenizer with U-MARVEL's three tokens added its way, and the PIL image processor."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == BASE_VOCAB
    for token in ADDED:
        assert tokenizer.add_tokens([token]) == 1
    image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": UMARVEL_MAX_PIXELS}
    return SimpleNamespace(tokenizer=tokenizer, image_processor=image_processor)


@pytest.fixture(scope="module")
def proc(model_dir: Path) -> Processor:
    return Processor(model_dir, EXACT)  # its own tokenizer, without the tokens


def reference(hf: SimpleNamespace, d: dict[str, Any], image: Image.Image | None, for_eval: bool) -> np.ndarray:
    """U-MARVEL's ids: chat template -> string, <|image_pad|> expanded by the grid, then the tokenizer."""
    text = hf.tokenizer.apply_chat_template(messages(d), tokenize=False, add_generation_prompt=for_eval)
    if "image" in d:
        grid = np.asarray(hf.image_processor(images=[image])["image_grid_thw"])[0]
        text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(np.prod(grid)) // 4))
    return np.asarray(hf.tokenizer(text, add_special_tokens=False)["input_ids"])


def _image(h: int = 120, w: int = 90, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _query(raw_instruction: str, raw_text: str | None, has_image: bool) -> tuple[Query, Instructions]:
    task = 7 if has_image and raw_text else 3 if has_image else 0
    q_mod, c_mod = TASK_MODALITIES[task]
    query = Query("9:1", 9, task, raw_text, "q.jpg" if has_image else None, q_mod, ("9:2",), ())
    return query, Instructions({(9, q_mod, c_mod): (raw_instruction,)})


# --- token ids ------------------------------------------------------------------------------------------

QUERIES = [  # (raw instruction, raw query text, has image)
    ("retrieve an image of this caption", "a dog running on the beach", False),
    ("find a caption", None, True),  # image-only
    ("find a caption", "", True),
    ('"find the answer"', "   what is shown here? ", True),  # quotes, leading spaces, trailing "?"
    ("retrieve an image", '"quoted text"', False),
    ("retrieve an image", "line one\r\nline two\r", False),  # \r dropped
    ("retrieve an image", "  leading spaces kept", True),
    ("retrieve a passage.", 'a trailing quote "', False),  # format_string leaves "quote ." here
    ("what is it?", "naïve café — 東京タワー 😀", True),
    ("retrieve", '""', False),  # text of quotes only: "<instruction_end> ."
]
CANDIDATES = [  # (raw text, has image)
    ("a red car parked outside.", False),
    (None, True),  # image-only
    ('  a photo of "two" cats  ', True),
    ("why? because", False),
]


@pytest.mark.parametrize("for_eval", [False, True])
@pytest.mark.parametrize(("raw_instruction", "raw_text", "has_image"), QUERIES)
def test_query_ids_and_pool_mask_equal_umarvel(
    proc: Processor, hf: SimpleNamespace, raw_instruction: str, raw_text: str | None, has_image: bool, for_eval: bool
) -> None:
    query, instructions = _query(raw_instruction, raw_text, has_image)
    instruction, text = query_text_parts(query, instructions, seed=0)
    # The exact user text is rebuilt from the two parts the processor gets.
    rebuilt = f"<instruction_start>{instruction}<instruction_end>" + (f" {text}" if text else ".")
    prompt = "<instruction_start>" + format_string(raw_instruction) + "<instruction_end>"
    assert rebuilt == format_string(f"{prompt} {raw_text or ''}")
    image = _image(seed=len(raw_instruction)) if has_image else None
    ex = proc(text or None, image, instruction=instruction, for_eval=for_eval)
    want = reference(hf, query_dict(raw_instruction, raw_text, has_image), image, for_eval)
    np.testing.assert_array_equal(ex.input_ids, want)
    start, end = hf.tokenizer.convert_tokens_to_ids(["<instruction_start>", "<instruction_end>"])
    np.testing.assert_array_equal(ex.pool_mask, 1 - instruction_mask(want, start, end))
    assert ex.pool_mask.sum() < len(want)  # the instruction is there and masked


@pytest.mark.parametrize("for_eval", [False, True])
@pytest.mark.parametrize(("raw_text", "has_image"), CANDIDATES)
def test_candidate_ids_equal_umarvel(
    proc: Processor, hf: SimpleNamespace, raw_text: str | None, has_image: bool, for_eval: bool
) -> None:
    image = _image(seed=3) if has_image else None
    ex = proc(format_string(raw_text) or None, image, for_eval=for_eval)
    want = reference(hf, candidate_dict(raw_text, has_image, for_eval), image, for_eval)
    np.testing.assert_array_equal(ex.input_ids, want)
    assert ex.pool_mask.tolist() == [1] * len(want)  # no instruction: everything is pooled


def test_forms_differ_where_umarvel_differs(proc: Processor, model_dir: Path) -> None:
    image = _image()
    train, test = proc(None, image), proc(None, image, for_eval=True)
    assert "Summarize above image in one word: " in proc.decode(train.input_ids)
    assert "Summarize above image and sentence in one word: " in proc.decode(test.input_ids)
    assert proc.decode(test.input_ids).endswith("<emb>.<|im_end|>\n<|im_start|>assistant\n")
    assert proc.decode(train.input_ids).endswith("<emb>.<|im_end|>\n")
    for name in ("umarvel", "last_token", "plain"):  # one form only
        other = Processor(model_dir, ProcessorConfig(template=name))
        a = other("A dog.", image, instruction="Find it.")
        b = other("A dog.", image, instruction="Find it.", for_eval=True)
        np.testing.assert_array_equal(a.input_ids, b.input_ids)


def test_template_strings_are_fixed() -> None:
    spec = TemplateSpec(name="umarvel_exact")
    assert (spec.instruction_start, spec.instruction_end, spec.embed_token) == tuple(ADDED[1:] + ADDED[:1])
    assert spec.summary_suffix.endswith("one word: ")
    assert spec.added_tokens() == tuple(ADDED) and TemplateSpec().added_tokens() == ()
    with pytest.raises(ValueError, match="fixed"):
        TemplateSpec(name="umarvel_exact", embed_token="<x>")


def test_truncation_cuts_text_before_instruction(model_dir: Path, hf: SimpleNamespace) -> None:
    p = Processor(model_dir, ProcessorConfig(template="umarvel_exact", max_text_tokens=4), tokenizer=hf.tokenizer)
    instruction = "Retrieve a long caption."
    ex = p("one two three four five six seven eight", instruction=instruction, for_eval=True)
    assert ex.truncated and ex.num_text_tokens == 4
    assert ex.num_instruction_tokens == len(hf.tokenizer(instruction, add_special_tokens=False)["input_ids"])
    s = p.decode(ex.input_ids)
    assert f"<instruction_start>{instruction}<instruction_end> one two three four\nSummarize above sentence" in s
    assert s.endswith("<emb>.<|im_end|>\n<|im_start|>assistant\n")
    np.testing.assert_array_equal(ex.input_ids, hf.tokenizer(s, add_special_tokens=False)["input_ids"])
    # max_length: the text goes first, then the instruction; the template stays whole.
    full = len(hf.tokenizer(p.render(None, instruction=instruction), add_special_tokens=False)["input_ids"])
    short = Processor(model_dir, ProcessorConfig(template="umarvel_exact", max_length=full - 2), tokenizer=hf.tokenizer)
    cut = short("some words here", instruction=instruction)
    assert cut.length <= full - 2 and cut.num_text_tokens == 0 and 0 < cut.num_instruction_tokens
    assert short.decode(cut.input_ids).endswith("<emb>.<|im_end|>\n")


def test_processor_adds_missing_tokens_in_umarvel_order(model_dir: Path, hf: SimpleNamespace, tmp_path: Path) -> None:
    p = Processor(model_dir, EXACT)
    assert p.added_tokens == tuple(ADDED) and p.vocab_size == BASE_VOCAB + 3
    ids = [p._special_ids[t] for t in ADDED]  # type: ignore[attr-defined]
    assert ids == hf.tokenizer.convert_tokens_to_ids(ADDED) == [BASE_VOCAB, BASE_VOCAB + 1, BASE_VOCAB + 2]
    # As in Hugging Face, the (non-special) added token inside free text becomes the token.
    assert p("say <emb> here").input_ids.tolist().count(BASE_VOCAB) == 2
    # A tokenizer that has them already (a saved U-MARVEL tokenizer) gets nothing added.
    saved = tmp_path / "saved"
    shutil.copytree(model_dir, saved)
    hf.tokenizer.save_pretrained(saved)
    again = Processor(saved, EXACT)
    assert again.added_tokens == () and again.vocab_size == BASE_VOCAB + 3
    np.testing.assert_array_equal(again("A.", instruction="Find.").input_ids, p("A.", instruction="Find.").input_ids)
    # Other templates add nothing.
    assert Processor(model_dir).added_tokens == () and Processor(model_dir).vocab_size == BASE_VOCAB


def test_pipelines_embed_in_the_evaluation_form(proc: Processor) -> None:
    from mmret.data.mbeir import Candidate
    from mmret.data.pipeline import candidate_dataset, query_dataset

    query, instructions = _query("find a caption", None, True)
    image = _image()
    store = SimpleNamespace(
        queries=[query],
        instructions=instructions,
        image=lambda path, max_pixels: image,
        candidate=lambda did: Candidate(did, None, "c.jpg", "image"),
    )
    kw = dict(batch_size=1, max_length=400, max_patches=512, process_index=0, process_count=1)
    (qb,) = list(query_dataset(store, proc, **kw))
    (cb,) = list(candidate_dataset(store, ["9:2"], proc, **kw))
    instruction, _ = query_text_parts(query, instructions, seed=0)
    want = (proc(None, image, instruction=instruction, for_eval=True), proc(None, image, for_eval=True))
    for batch, ex in zip((qb, cb), want, strict=True):
        np.testing.assert_array_equal(batch["input_ids"][0, : ex.length], ex.input_ids)
        np.testing.assert_array_equal(batch["pool_mask"][0, : ex.length], ex.pool_mask)


# --- vocabulary growth and conversion ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_vocab_dir(tmp_path_factory: pytest.TempPathFactory, processor_dir: Path) -> Path:
    """A tiny untied Qwen2-VL whose embedding ends at the tokenizer's size (no padded rows), via torch."""
    torch = pytest.importorskip("torch")
    from mmret.models.qwen2_vl.presets import hf_config

    out = tmp_path_factory.mktemp("short_vocab")
    config = {**hf_config("tiny"), "vocab_size": BASE_VOCAB, "tie_word_embeddings": False, "torch_dtype": "float32"}
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(**json.loads(json.dumps(config))))
    model.save_pretrained(out, safe_serialization=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copytree(processor_dir, out, dirs_exist_ok=True)  # the processor files beside the weights
    return out


def test_embedding_grows_only_when_needed(proc: Processor, short_vocab_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    from mmret.build import load_backbone
    from mmret.models import qwen2_vl
    from mmret.models.qwen2_vl.hf import grow_vocab
    from mmret.models.qwen2_vl.presets import hf_config
    from mmret.recipe import ModelConfig

    # The tiny preset keeps Qwen2-VL's padded 151,936 rows: the added ids fit, nothing grows.
    padded = qwen2_vl.create(qwen2_vl.Qwen2VLConfig.from_hf_dict(hf_config("tiny")))
    assert grow_vocab(padded, proc.vocab_size) is padded
    assert load_backbone(ModelConfig(preset="tiny"), vocab_size=proc.vocab_size).cfg.text.vocab_size == 151936

    # Rows ending at the tokenizer's size: grown to cover the three ids, as resize_token_embeddings grows.
    short = Processor(short_vocab_dir, EXACT)
    assert short.vocab_size == BASE_VOCAB + 3
    grown = qwen2_vl.from_hf(short_vocab_dir, jnp.float32, min_vocab_size=short.vocab_size, with_lm_head=True)
    ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(short_vocab_dir)
    old_embed = ref.get_input_embeddings().weight.detach().numpy().copy()
    old_head = ref.get_output_embeddings().weight.detach().numpy().copy()
    torch.manual_seed(1)
    ref.resize_token_embeddings(short.vocab_size)  # transformers' default (mean_resizing=True)
    embed = np.asarray(grown.language_model.embed_tokens.embedding.get_value())
    head = np.asarray(grown.lm_head.kernel.get_value()).T
    assert grown.cfg.text.vocab_size == embed.shape[0] == head.shape[0] == BASE_VOCAB + 3
    for ours, old, theirs in (
        (embed, old_embed, ref.get_input_embeddings().weight.detach().numpy()),
        (head, old_head, ref.get_output_embeddings().weight.detach().numpy()),
    ):
        np.testing.assert_array_equal(ours[:BASE_VOCAB], old)
        # New rows: the old rows' mean plus noise of ~3e-5 std, both here and in torch's draw.
        np.testing.assert_allclose(ours[BASE_VOCAB:], theirs[BASE_VOCAB:], rtol=0, atol=1e-3 * old.std())
        assert np.abs(ours[BASE_VOCAB:] - old.mean(0)).max() < 1e-2 * old.std()
    again = load_backbone(ModelConfig(hf_dir=str(short_vocab_dir)), vocab_size=short.vocab_size)
    np.testing.assert_array_equal(np.asarray(again.language_model.embed_tokens.embedding.get_value()), embed)
    # The grown model embeds the processor's inputs, added ids included.
    ex = short("A dog.", instruction="Find a caption.")
    assert ex.input_ids.max() == BASE_VOCAB + 2  # <instruction_end>
    out = grown(ex.input_ids[None], ex.attention_mask[None])
    assert np.isfinite(np.asarray(out.last_hidden_state)).all()


def test_conversion_keeps_added_tokens_and_grown_rows(short_vocab_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from mmret.convert.checkpoint import convert_from_hf, hf_files_dir, load_model, read_info, save_model
    from mmret.convert.export import export_to_hf
    from mmret.models import qwen2_vl

    short = Processor(short_vocab_dir, EXACT)
    grown = qwen2_vl.from_hf(short_vocab_dir, jnp.float32, min_vocab_size=short.vocab_size, with_lm_head=True)
    ckpt = save_model(tmp_path / "ckpt", grown, hf_files_from=short_vocab_dir, added_tokens=short.added_tokens)
    assert read_info(ckpt).hf_config["vocab_size"] == BASE_VOCAB + 3
    hub = export_to_hf(ckpt, tmp_path / "hub")
    assert json.loads((hub / "config.json").read_text())["vocab_size"] == BASE_VOCAB + 3
    tok = transformers.AutoTokenizer.from_pretrained(hub)
    assert len(tok) == BASE_VOCAB + 3 and tok.convert_tokens_to_ids(ADDED) == list(range(BASE_VOCAB, BASE_VOCAB + 3))
    tensors = load_file(str(hub / "model.safetensors"))
    embed = np.asarray(grown.language_model.embed_tokens.embedding.get_value())
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], embed)
    np.testing.assert_array_equal(tensors["lm_head.weight"], np.asarray(grown.lm_head.kernel.get_value()).T)
    hf_model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(hub)  # no size mismatch
    np.testing.assert_array_equal(hf_model.get_input_embeddings().weight.detach().numpy(), embed)
    # Back again: the rows, the config and the tokens survive; the processor adds nothing now.
    back = convert_from_hf(hub, tmp_path / "back")
    loaded = load_model(back, with_lm_head=True)
    np.testing.assert_array_equal(np.asarray(loaded.language_model.embed_tokens.embedding.get_value()), embed)
    for where in (hub, hf_files_dir(back)):
        p = Processor(where, EXACT)
        assert p.added_tokens == () and p.vocab_size == BASE_VOCAB + 3
        q = ("A dog.", None)
        np.testing.assert_array_equal(p(*q, instruction="Find.").input_ids, short(*q, instruction="Find.").input_ids)
    # A token outside the table is refused.
    with pytest.raises(ValueError, match="outside"):
        save_model(tmp_path / "bad", grown, hf_files_from=hub, added_tokens=["<another>"])
