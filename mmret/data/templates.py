"""Prompt templates: how a query or a candidate is laid out as model input, as a list of typed pieces.

A template renders ``(instruction, text, image?)`` into :class:`Piece` s. Each piece is either one special
token (kinds ``special``, ``image``, ``marker``, ``embed``) or a run of ordinary text (kinds ``scaffold``,
``instruction``, ``text``); the processor tokenises consecutive text pieces together (exactly as the
tokenizer would tokenise the whole rendered string) and uses the kinds to build the pool mask and to
truncate. Three templates (``<image>`` below stands for ``<|vision_start|><|image_pad|><|vision_end|>``
and is left out when there is no image; ``{system}`` is the system turn, left out when
``system_prompt`` is None):

``umarvel`` (U-MARVEL; bidirectional attention, mean pooling without the instruction)::

    {system}<|im_start|>user\\n<image><|object_ref_start|>{instruction}<|object_ref_end|> {text}
    \\nSummarize above {modality} in one word:<|im_end|>\\n<|im_start|>assistant\\n<|endoftext|>

  (one line in reality). ``{modality}`` is "image and sentence", "image" or "sentence" after the input.
  The two instruction markers and the embedding token are tokens of the Qwen2-VL vocabulary that plain
  text never produces (Qwen2-VL uses the object-ref pair only for grounding prompts), so no embedding
  table resize is needed; all three are configurable.

``last_token`` (GME / VLM2Vec; causal, pooling reads the last token)::

    {system}<|im_start|>user\\n<image>{instruction} {text}<|im_end|>\\n<|im_start|>assistant\\n<|endoftext|>

``plain`` (no chat template)::

    <image>{instruction} {text}

Everything up to and including ``<|im_start|>assistant\\n`` is what the Qwen2-VL chat template
(``apply_chat_template(..., add_generation_prompt=True)``) renders for one user turn holding the image
and the text. Candidates get no instruction: then the markers and the separating space are left out.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

TemplateName = Literal["umarvel", "last_token", "plain"]
TEMPLATE_NAMES: tuple[str, ...] = ("umarvel", "last_token", "plain")

#: Piece kinds that are exactly one special token.
TOKEN_KINDS = frozenset({"special", "image", "marker", "embed"})
#: Piece kinds made of ordinary text (tokenised).
TEXT_KINDS = frozenset({"scaffold", "instruction", "text"})

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

#: ``{modality}`` of the summary suffix, keyed by (has image, has text).
MODALITY_WORDS: dict[tuple[bool, bool], str] = {
    (True, True): "image and sentence",
    (True, False): "image",
    (False, True): "sentence",
}


@dataclasses.dataclass(frozen=True)
class Piece:
    """One piece of a rendered prompt: its kind and its string (a token string for token kinds)."""

    kind: str
    text: str


@dataclasses.dataclass(frozen=True)
class TemplateSpec:
    """Which template, and its configurable strings (defaults: see the module docstring).

    ``instruction_start`` / ``instruction_end`` wrap the instruction (``umarvel`` only);
    ``embed_token`` ends ``umarvel`` and ``last_token`` prompts; ``summary_suffix`` (``umarvel`` only)
    may use ``{modality}``; ``system_prompt`` None drops the system turn (note the Qwen2-VL chat
    template would add its default one).
    """

    name: TemplateName = "umarvel"
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    instruction_start: str = "<|object_ref_start|>"
    instruction_end: str = "<|object_ref_end|>"
    embed_token: str = "<|endoftext|>"
    summary_suffix: str = "\nSummarize above {modality} in one word:"

    def __post_init__(self) -> None:
        if self.name not in TEMPLATE_NAMES:
            raise ValueError(f"unknown template {self.name!r}; choose one of {list(TEMPLATE_NAMES)}")

    def special_tokens(self) -> tuple[str, ...]:
        """Every special-token string this template can emit (the tokenizer must know them all)."""
        return (
            IM_START,
            IM_END,
            VISION_START,
            VISION_END,
            IMAGE_PAD,
            self.instruction_start,
            self.instruction_end,
            self.embed_token,
        )

    def render(self, *, instruction: str | None, text: str | None, has_image: bool, has_text: bool) -> list[Piece]:
        """The prompt as pieces. ``has_text`` picks the summary wording (it stays put when truncation
        empties ``text``); empty strings count as absent. The image is one ``image`` piece (expanded later).
        """
        user: list[Piece] = []
        if has_image:
            user += [Piece("special", VISION_START), Piece("image", IMAGE_PAD), Piece("special", VISION_END)]
        if instruction:
            if self.name == "umarvel":
                user += [
                    Piece("marker", self.instruction_start),
                    Piece("instruction", instruction),
                    Piece("marker", self.instruction_end),
                ]
            else:
                user.append(Piece("instruction", instruction))
        if text:
            user.append(Piece("text", " " + text if instruction else text))
        if self.name == "plain":
            return user
        if self.name == "umarvel":
            words = MODALITY_WORDS.get((has_image, has_text), MODALITY_WORDS[(False, True)])
            user.append(Piece("scaffold", self.summary_suffix.format(modality=words)))
        pieces: list[Piece] = []
        if self.system_prompt is not None:
            pieces += [
                Piece("special", IM_START),
                Piece("scaffold", "system\n" + self.system_prompt),
                Piece("special", IM_END),
                Piece("scaffold", "\n"),
            ]
        pieces += [Piece("special", IM_START), Piece("scaffold", "user\n"), *user, Piece("special", IM_END)]
        pieces += [Piece("scaffold", "\n"), Piece("special", IM_START), Piece("scaffold", "assistant\n")]
        pieces.append(Piece("embed", self.embed_token))
        return pieces


def render_string(pieces: list[Piece]) -> str:
    """The rendered prompt as one string (what a Hugging Face processor would be given)."""
    return "".join(p.text for p in pieces)
