"""A (query, candidate) pair as one reranker sequence: token ids, both images' patches, the answer position
and, in the training form, the trained targets.

The sequence is the backbone's chat template over one user turn (:mod:`mmret.data.rerank_prompts`) with the
backbone's default system turn before it (Qwen2-VL's and Qwen2.5-VL's; Qwen3-VL's template adds none), as Hugging
Face's ``apply_chat_template`` renders U-MARVEL's messages:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n{instruction}{query label}
    [<|vision_start|><|image_pad|>...<|vision_end|>]{query text}{candidate label}[image]{candidate text}
    <|im_end|>\\n<|im_start|>assistant\\n                                  (evaluation: the generation prompt)
    ... Yes<|im_end|>\\n                                                  (training: the answer turn)

Tokenised as Hugging Face tokenises the rendered string: special tokens by id, the text between two special
tokens as one run (so "Query:" + text + "Candidate:" of a text-only query is one run). ``answer_index`` is the
position whose next-token logits give the first answer token (the generation prompt's last token).

Training targets (``loss_on``): ``"assistant_turn"`` (U-MARVEL's collator, ``collators/mbeir_rerank.py``:
the system turn and the user turn are masked, so the labels are the whole assistant turn,
``<|im_start|>assistant\\n`` + answer + ``<|im_end|>\\n``) or ``"answer"`` (the answer token alone). Each target
is the token at ``position + 1`` (the causal LM's shift), listed as ``target_positions`` / ``target_ids``.

Texts: UniIR-formatted (the caller's job: the query text carries its instruction, ``"{instruction} {text}"``
formatted as one string, as U-MARVEL's datasets do); each text is cut to ``max_text_tokens`` tokens as U-MARVEL's
training does (tokenise, keep the first 256, decode); a text that is empty after formatting is left out, as is
an absent image.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from mmret.data.packing import PackingConfig, pack
from mmret.data.processor import ImageInput, ProcessedExample, Processor, collate
from mmret.data.rerank_prompts import RerankPrompt

LossOn = Literal["assistant_turn", "answer"]

#: A chat turn's open / close.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class RerankExample:
    """One rendered pair; ``example`` holds the arrays :func:`collate` pads (pool mask all zeros)."""

    example: ProcessedExample
    answer_index: int  # the position whose logits give the first answer token
    target_positions: np.ndarray  # [T] int32: positions whose next token is trained (training form; else [0])
    target_ids: np.ndarray  # [T] int32: those next tokens
    truncated: bool  # whether a text was cut to max_text_tokens


def query_text(instruction: str | None, text: str | None) -> str:
    """UniIR's query text from a query's final instruction and text (:class:`mmret.data.example.Part`): the
    instruction, a space, the text (either alone when the other is empty)."""
    return " ".join(t for t in (instruction, text) if t)


class PairRenderer:
    """Renders pairs under ``prompt`` with ``processor``'s tokenizer and image patcher (see the module
    docstring)."""

    def __init__(
        self,
        processor: Processor,
        prompt: RerankPrompt,
        *,
        max_text_tokens: int | None = 256,
        loss_on: LossOn = "assistant_turn",
    ) -> None:
        if loss_on not in ("assistant_turn", "answer"):
            raise ValueError(f"rerank loss_on must be 'assistant_turn' or 'answer', got {loss_on!r}")
        self.processor, self.prompt = processor, prompt
        self.max_text_tokens, self.loss_on = max_text_tokens, loss_on
        tokens = processor.backbone.tokens
        self._ids = {
            name: processor.token_id(text)
            for name, text in (
                ("start", IM_START),
                ("end", IM_END),
                ("vision_start", tokens.vision_start.text),
                ("vision_end", tokens.vision_end.text),
            )
        }
        self.image_token_id = processor.image_token_id
        self.yes_id, self.no_id = self._answer_id(prompt.yes), self._answer_id(prompt.no)

    def _answer_id(self, answer: str) -> int:
        """The answer's one token, as it is tokenised after the generation prompt."""
        head = self.processor.encode("assistant\n")
        ids = self.processor.encode("assistant\n" + answer)
        if len(ids) != len(head) + 1 or ids[: len(head)] != head:
            raise ValueError(f"rerank prompt {self.prompt.name!r}: the answer {answer!r} is not one token")
        return ids[-1]

    def cut(self, text: str) -> tuple[str, bool]:
        """``text`` cut to its first ``max_text_tokens`` tokens (decoded back), and whether it was cut."""
        if self.max_text_tokens is None:
            return text, False
        ids = self.processor.encode(text)
        if len(ids) <= self.max_text_tokens:
            return text, False
        return self.processor.decode(ids[: self.max_text_tokens]), True

    def __call__(
        self,
        query_text: str,
        query_image: ImageInput | None,
        candidate_text: str,
        candidate_image: ImageInput | None,
        *,
        answer: bool | None = None,
    ) -> RerankExample:
        """The pair's sequence: the evaluation form (``answer=None``: ends with the generation prompt) or the
        training form (``answer``: True for the prompt's yes, False for its no)."""
        p = self.prompt
        query_text, cut_q = self.cut(query_text)
        candidate_text, cut_c = self.cut(candidate_text)
        # (kind, value): "text" runs are tokenised together up to the next special token
        system = self.processor.backbone.default_system_prompt
        parts: list[tuple[str, Any]] = []
        if system is not None:
            parts += [("special", "start"), ("text", "system\n" + system), ("special", "end"), ("text", "\n")]
        parts += [("special", "start"), ("text", "user\n" + p.instruction + p.query_label)]
        images = []
        for text, image, tail in (
            (query_text, query_image, p.candidate_label),
            (candidate_text, candidate_image, ""),
        ):
            if image is not None:
                images.append(self.processor.patcher(image))
                parts.append(("image", len(images) - 1))
            parts.append(("text", text + tail))
        parts += [("special", "end"), ("text", "\n"), ("special", "start"), ("text", "assistant\n")]
        if answer is not None:
            parts += [("text", p.yes if answer else p.no), ("special", "end"), ("text", "\n")]
        merge = self.processor.patcher.merge_size**2
        ids: list[int] = []
        assistant_start = answer_index = -1
        run = ""
        for kind, value in [*parts, ("special", None)]:
            if kind == "text":
                run += value
                continue
            if run:
                if run.startswith("assistant\n"):
                    answer_index = len(ids) + len(self.processor.encode("assistant\n")) - 1
                ids += self.processor.encode(run)
                run = ""
            if kind == "image":
                grid = images[value][1]
                ids += [self._ids["vision_start"], *[self.image_token_id] * (int(np.prod(grid)) // merge)]
                ids.append(self._ids["vision_end"])
            elif value is not None:
                if value == "start" and answer_index < 0:
                    assistant_start = len(ids)  # the last turn's <|im_start|> (the assistant's)
                ids.append(self._ids[value])
        arr = np.asarray(ids, dtype=np.int32)
        if answer is None:
            positions = targets = np.zeros(0, np.int32)
        else:
            first = assistant_start if self.loss_on == "assistant_turn" else answer_index + 1
            targets = arr[first:]
            if self.loss_on == "answer":
                targets = targets[:1]
            positions = np.arange(first - 1, first - 1 + len(targets), dtype=np.int32)
        pixel_values = np.concatenate([px for px, _ in images]) if images else None
        grid = np.concatenate([g for _, g in images]).astype(np.int32) if images else None
        attention = np.ones(arr.shape, np.int32)
        position_ids = self.processor.backbone.position_ids(
            arr[None],
            attention[None],
            grid,
            image_token_id=self.image_token_id,
            spatial_merge_size=self.processor.patcher.merge_size,
            xp=np,
        )[:, 0].astype(np.int32)
        example = ProcessedExample(
            input_ids=arr,
            attention_mask=attention,
            pool_mask=np.zeros(arr.shape, np.int32),
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            num_text_tokens=int(bool(query_text)) + int(bool(candidate_text)),
            num_instruction_tokens=0,
            num_image_tokens=int(np.sum(arr == self.image_token_id)),
            truncated=cut_q or cut_c,
        )
        return RerankExample(example, answer_index, positions, targets.astype(np.int32), cut_q or cut_c)


def collate_pairs(
    pairs: list[RerankExample],
    *,
    max_length: int,
    max_patches: int,
    max_targets: int = 8,
    pad_token_id: int,
    patch_dim: int,
    packing: PackingConfig | None = None,
) -> dict[str, np.ndarray]:
    """:func:`mmret.data.processor.collate` of the pairs (right padding, up to two images each) plus
    ``answer_index`` [B] and ``target_positions`` / ``target_ids`` / ``target_mask`` [B, max_targets].

    ``packing`` (enabled): the pairs packed (:func:`mmret.data.packing.pack`), rows of ``max_length``; the
    positions then are columns of each row's segments, ``answer_index`` [R, S] and ``target_positions``
    [R, S, max_targets] (the model gathers them row by row, then per pair through ``slot``).
    """
    examples = [p.example for p in pairs]
    images = 3 * len(pairs)  # two images a pair at most, the filler, rows divisible as the pairs are
    if packing is not None and packing.enabled:
        batch = pack(
            examples,
            packing,
            row_length=max_length,
            max_patches=max_patches,
            max_images=images,
            pad_token_id=pad_token_id,
            patch_dim=patch_dim,
        )
    else:
        batch = collate(
            examples,
            max_length=max_length,
            max_patches=max_patches,
            max_images=images,
            pad_token_id=pad_token_id,
            patch_dim=patch_dim,
        )
    positions = np.zeros((len(pairs), max_targets), np.int32)
    ids = np.zeros((len(pairs), max_targets), np.int32)
    mask = np.zeros((len(pairs), max_targets), np.int32)
    for b, p in enumerate(pairs):
        n = len(p.target_ids)
        if n > max_targets:
            raise ValueError(f"pair {b} has {n} trained targets, more than max_targets={max_targets}")
        positions[b, :n], ids[b, :n], mask[b, :n] = p.target_positions, p.target_ids, 1
    answer = np.array([p.answer_index for p in pairs], np.int32)
    if "slot" in batch:  # columns in the rows, laid out per segment
        rows, segments = batch["segment_lengths"].shape
        start = batch["starts"]
        row_answer = np.zeros(rows * segments, np.int32)
        row_answer[batch["slot"]] = answer + start
        row_positions = np.zeros((rows * segments, max_targets), np.int32)
        row_positions[batch["slot"]] = positions + start[:, None]
        answer, positions = row_answer.reshape(rows, segments), row_positions.reshape(rows, segments, max_targets)
    batch.update(answer_index=answer, target_positions=positions, target_ids=ids, target_mask=mask)
    return batch
