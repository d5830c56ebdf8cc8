"""The pointwise reranker against the outside world: U-MARVEL's prompt text and message layout rendered by
Hugging Face's chat template and processor (written here as U-MARVEL's datasets and collators build them),
U-MARVEL's label masking, and P(yes) from Hugging Face PyTorch's logits on the same pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import load_tool  # noqa: E402
from PIL import Image  # noqa: E402

from mmret import models  # noqa: E402
from mmret.data.processor import Processor, ProcessorConfig  # noqa: E402
from mmret.data.rerank_pairs import PairRenderer, collate_pairs  # noqa: E402
from mmret.data.rerank_prompts import MMEMBED, UMARVEL, get_prompt  # noqa: E402
from mmret.models.qwen2_vl import processor_files as pf  # noqa: E402
from mmret.models.reranker import Reranker  # noqa: E402

IGNORE = -100

# U-MARVEL's string, built the way its source builds it: a backslash continues the literal, so the next
# line's indentation (24 spaces) is part of the text.
UMARVEL_TEXT = "I will provide you with a query and a candidate. Please evaluate whether the candidate\
                        meets the requirements of the query. If it does, respond with 'Yes'; if it doesn't, responed with 'No'."  # noqa: E501


def image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


#: (query text, query image, candidate text, candidate image)
PAIRS = [
    ("Retrieve an image of this caption. A dog on a beach.", None, "", image(56, 84, 1)),
    ("Find a similar photo with this change. Make it red.", image(60, 90, 2), "", image(84, 56, 3)),
    ("Answer the question. What is the capital of France?", None, "Paris is the capital of France.", None),
    ("Identify the landmark in the image.", image(56, 56, 4), "The Eiffel Tower, Paris.", image(112, 56, 5)),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny random model with its weights perturbed well beyond init (so answers' logits differ)."""
    tiny = tmp_path_factory.mktemp("tiny") / "model"
    assert load_tool("make_tiny_model").main(["--out", str(tiny), "--preset", "tiny", "--seed", "0"]) == 0
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tiny)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("perturbed") / "model"
    hf.save_pretrained(out)
    for f in tiny.iterdir():  # the tokenizer and processor files
        if not (out / f.name).exists():
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def hf_model(model_dir) -> Any:
    return transformers.Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def reranker(model_dir) -> Reranker:
    return Reranker(models.from_hf(model_dir, dtype="float32", with_lm_head=True))


@pytest.fixture(scope="module")
def hf_processor(model_dir) -> Any:
    return pf.load_processor(model_dir)


@pytest.fixture(scope="module")
def processor(model_dir) -> Processor:
    return Processor(model_dir, ProcessorConfig())


def umarvel_messages(query_text, query_image, cand_text, cand_image, answer: str | None = None) -> list[dict]:
    """U-MARVEL's ``construct_rerank_messages`` (its ``_prepare_data_dict`` drops an empty candidate text
    when the candidate has an image)."""
    content = [{"type": "text", "text": UMARVEL_TEXT}, {"type": "text", "text": "Query:"}]
    if query_image is not None:
        content.append({"type": "image", "image": query_image})
    content.append({"type": "text", "text": query_text})
    content.append({"type": "text", "text": "Candidate:"})
    if cand_image is not None:
        content.append({"type": "image", "image": cand_image})
    if cand_text or cand_image is None:
        content.append({"type": "text", "text": cand_text})
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def hf_inputs(hf_processor, messages: list[dict], *, generation: bool) -> dict[str, np.ndarray]:
    text = hf_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    images = [item["image"] for m in messages for item in m["content"] if item["type"] == "image"]
    out = hf_processor(text=[text], images=images or None, return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


def umarvel_labels(ids: np.ndarray) -> np.ndarray:
    """U-MARVEL's ``MbeirRerankDataCollator`` on one unpadded row: the user turns (from each odd <|im_start|>
    to the next one) and the first 11 tokens (the system turn) are ignored."""
    labels = ids.astype(np.int64).copy()
    starts = np.nonzero(ids == 151644)[0]
    for j in range(1, len(starts), 2):
        labels[starts[j] : starts[j + 1]] = IGNORE
    labels[:11] = IGNORE
    return labels


def test_umarvels_prompt_text_is_exact():
    assert UMARVEL.instruction == UMARVEL_TEXT and "candidate" + " " * 24 + "meets" in UMARVEL_TEXT
    assert (UMARVEL.yes, UMARVEL.no, MMEMBED.yes, MMEMBED.no) == ("Yes", "No", "True", "False")
    assert get_prompt("mmembed") is MMEMBED
    with pytest.raises(ValueError, match="rerank prompt must be one of"):
        get_prompt("lamra")


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_pairs_tokenise_as_hugging_face_renders_umarvels_messages(i, processor, hf_processor):
    q, qi, c, ci = PAIRS[i]
    renderer = PairRenderer(processor, UMARVEL)
    # evaluation form: the generation prompt closes the sequence; the answer logits are the last position's
    ours = renderer(q, qi, c, ci)
    ref = hf_inputs(hf_processor, umarvel_messages(q, qi, c, ci), generation=True)
    np.testing.assert_array_equal(ours.example.input_ids, ref["input_ids"][0])
    assert ours.answer_index == len(ref["input_ids"][0]) - 1
    if qi is None and ci is None:
        assert ours.example.pixel_values is None and "pixel_values" not in ref
    else:
        np.testing.assert_array_equal(ours.example.pixel_values, ref["pixel_values"])
        np.testing.assert_array_equal(ours.example.image_grid_thw, ref["image_grid_thw"])
    # training form: U-MARVEL's labels, shifted as the causal LM's loss reads them
    for answer in (True, False):
        ours = renderer(q, qi, c, ci, answer=answer)
        word = "Yes" if answer else "No"
        ref = hf_inputs(hf_processor, umarvel_messages(q, qi, c, ci, word), generation=False)["input_ids"][0]
        np.testing.assert_array_equal(ours.example.input_ids, ref)
        labels = umarvel_labels(ref)
        (positions,) = np.nonzero(labels[1:] != IGNORE)  # position p predicts token p + 1
        np.testing.assert_array_equal(ours.target_positions, positions)
        np.testing.assert_array_equal(ours.target_ids, ref[positions + 1])
        assert processor.decode(ours.target_ids) == f"<|im_start|>assistant\n{word}<|im_end|>\n"
        answer_only = PairRenderer(processor, UMARVEL, loss_on="answer")(q, qi, c, ci, answer=answer)
        assert answer_only.target_ids.tolist() == [renderer.yes_id if answer else renderer.no_id]
        assert answer_only.target_positions.tolist() == [answer_only.answer_index]
        assert processor.decode(ref[answer_only.answer_index + 1 : answer_only.answer_index + 2]) == word


def test_texts_are_cut_as_umarvels_training_cuts_them(processor, hf_processor):
    """U-MARVEL: ``tokenizer(text, truncation=True, max_length=256)``, then ``decode``."""
    tokenizer = hf_processor.tokenizer
    long_text = " ".join(f"word{k} and, more" for k in range(300))
    ref_ids = tokenizer(long_text, truncation=True, max_length=256, add_special_tokens=False)["input_ids"]
    cut = tokenizer.decode(ref_ids)
    renderer = PairRenderer(processor, UMARVEL)
    assert renderer.cut(long_text) == (cut, True) and renderer.cut("short.") == ("short.", False)
    ours = renderer(long_text, None, long_text, None, answer=True)
    ref = hf_inputs(hf_processor, umarvel_messages(cut, None, cut, None, "Yes"), generation=False)["input_ids"][0]
    np.testing.assert_array_equal(ours.example.input_ids, ref)
    assert ours.truncated


def test_an_answer_of_several_tokens_is_refused(processor):
    bad = UMARVEL.__class__(**{**UMARVEL.__dict__, "name": "bad", "yes": "Absolutely yes"})
    with pytest.raises(ValueError, match="not one token"):
        PairRenderer(processor, bad)


@pytest.mark.parametrize("prompt", [UMARVEL, MMEMBED], ids=lambda p: p.name)
def test_score_equals_hugging_face_pytorch(prompt, hf_model, reranker, processor, hf_processor):
    """P(yes) of a padded batch of pairs = the softmax over the answers' logits of the Hugging Face model's
    last position, each pair run alone (float32)."""
    hf = hf_model
    renderer = PairRenderer(processor, prompt)
    yes = hf_processor.tokenizer(prompt.yes)["input_ids"][0]  # U-MARVEL: tokenizer("Yes").input_ids[0]
    no = hf_processor.tokenizer(prompt.no)["input_ids"][0]
    assert (renderer.yes_id, renderer.no_id) == (yes, no)
    expected = []
    pairs = [renderer(*p) for p in PAIRS]
    for p in pairs:
        ex = p.example
        inputs = {"input_ids": torch.tensor(ex.input_ids[None].astype(np.int64))}
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == processor.image_token_id).long()
        if ex.pixel_values is not None:
            inputs["pixel_values"] = torch.tensor(ex.pixel_values)
            inputs["image_grid_thw"] = torch.tensor(ex.image_grid_thw.astype(np.int64))
        with torch.no_grad():
            logits = hf(**inputs).logits[0, -1].double()
        expected.append(torch.softmax(torch.stack([logits[yes], logits[no]]), 0)[0].item())
    batch = collate_pairs(
        pairs,
        max_length=max(p.example.length for p in pairs) + 5,
        max_patches=sum(p.example.num_patches for p in pairs) + 16,
        pad_token_id=processor.pad_token_id,
        patch_dim=processor.patcher.patch_dim,
    )
    scores = np.asarray(reranker.score({k: jnp.asarray(v) for k, v in batch.items()}, yes, no))
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.ptp(expected) > 1e-3  # the pairs' scores differ: the comparison could fail


@pytest.mark.parametrize("loss_on", ["assistant_turn", "answer"])
def test_lm_loss_equals_hugging_faces_loss_with_umarvels_labels(loss_on, hf_model, reranker, processor):
    """The train step's loss = Hugging Face's own causal LM loss (``labels=``, mean over the unmasked shifted
    labels of the padded batch) with U-MARVEL's collator's labels (``assistant_turn``) or the answer alone."""
    from mmret.tasks.reranker.step import reranker_loss

    renderer = PairRenderer(processor, UMARVEL, loss_on=loss_on)
    answers = [True, False, False, True]
    pairs = [renderer(*p, answer=a) for p, a in zip(PAIRS, answers, strict=True)]
    length = max(p.example.length for p in pairs)
    ids = np.full((len(pairs), length), processor.pad_token_id, np.int64)
    labels = np.full((len(pairs), length), IGNORE, np.int64)
    attention = np.zeros((len(pairs), length), np.int64)
    for b, p in enumerate(pairs):
        row = p.example.input_ids
        ids[b, : len(row)], attention[b, : len(row)] = row, 1
        if loss_on == "assistant_turn":
            labels[b, : len(row)] = umarvel_labels(row)
        else:  # the answer token alone: the token after the generation prompt
            at = p.answer_index + 1
            labels[b, at] = row[at]
    pixels = [p.example.pixel_values for p in pairs if p.example.pixel_values is not None]
    grids = [p.example.image_grid_thw for p in pairs if p.example.image_grid_thw is not None]
    with torch.no_grad():
        expected = hf_model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(attention),
            pixel_values=torch.tensor(np.concatenate(pixels)),
            image_grid_thw=torch.tensor(np.concatenate(grids).astype(np.int64)),
            mm_token_type_ids=torch.tensor((ids == processor.image_token_id).astype(np.int64)),
            labels=torch.tensor(labels),
        ).loss.item()
    batch = collate_pairs(
        pairs,
        max_length=length + 3,
        max_patches=sum(p.example.num_patches for p in pairs) + 8,
        pad_token_id=processor.pad_token_id,
        patch_dim=processor.patcher.patch_dim,
    )
    batch["labels"] = np.array(answers, np.int32)
    loss, metrics = reranker_loss(
        reranker, {k: jnp.asarray(v) for k, v in batch.items()}, renderer.yes_id, renderer.no_id
    )
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    scores = np.asarray(reranker.score({k: jnp.asarray(v) for k, v in batch.items()}, renderer.yes_id, renderer.no_id))
    assert float(metrics["accuracy"]) == np.mean((scores > 0.5) == np.array(answers))
