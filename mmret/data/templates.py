"""Prompt templates: how a query or a candidate is laid out as model input, as a list of typed pieces.

A template renders ``(instruction, text, image?)`` into :class:`Piece` s. Each piece is either one special
token (kinds ``special``, ``image``, ``marker``, ``embed``) or a run of ordinary text (kinds ``scaffold``,
``instruction``, ``text``); the processor tokenises consecutive text pieces together (exactly as the
tokenizer would tokenise the whole rendered string) and uses the kinds to build the pool mask and to
truncate. Four templates (``<image>`` below stands for ``<|vision_start|><|image_pad|><|vision_end|>``
and is left out when there is no image; ``{system}`` is the system turn, by default the one the backbone's
chat template adds (Qwen2-VL's ``<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n``, none on
Qwen3-VL), left out when ``system_prompt`` is None):

``umarvel`` (U-MARVEL's layout on the existing Qwen2-VL vocabulary; bidirectional attention, mean pooling
without the instruction)::

    {system}<|im_start|>user\\n<image><|object_ref_start|>{instruction}<|object_ref_end|> {text}
    \\nSummarize above {modality} in one word:<|im_end|>\\n<|im_start|>assistant\\n<|endoftext|>

  (one line in reality). ``{modality}`` is "image and sentence", "image" or "sentence" after the input.
  The two instruction markers and the embedding token are tokens of the Qwen2-VL vocabulary that plain
  text never produces (Qwen2-VL uses the object-ref pair only for grounding prompts), so no embedding
  table resize is needed; all three are configurable.

``umarvel_exact`` (U-MARVEL's released code, byte for byte: ``dataset/datasets_mbeir.py``,
``collators/qwen2_vl_7b.py`` and ``collators/mbeir_eval.py``)::

    {system}<|im_start|>user\\n<image><instruction_start>{instruction}<instruction_end> {text}
    \\nSummarize above {modality} in one word: <|im_end|>\\n<|im_start|>assistant\\n<emb>.<|im_end|>\\n

  plus ``<|im_start|>assistant\\n`` in the evaluation form (U-MARVEL's evaluation collators render with
  ``add_generation_prompt=True``, its training collator without). ``<instruction_start>``,
  ``<instruction_end>`` and ``<emb>`` are tokens U-MARVEL's loader ADDS (``tokenizer.add_tokens``, not
  special, in the order ``<emb>``, ``<instruction_start>``, ``<instruction_end>``; see
  :data:`UMARVEL_ADDED_TOKENS`); the processor adds the ones a tokenizer lacks. The user text is UniIR's
  ``format_string("<instruction_start>" + instruction + "<instruction_end>" + " " + query text)``: with
  no query text that is ``<instruction_start>{instruction}<instruction_end>.`` (the ``"."`` lands after
  the marker). Wording: a query always counts its instruction as text ("image and sentence" with an
  image, else "sentence"); a candidate says "image and sentence" / "sentence" / "image" after its
  modalities, except that U-MARVEL's evaluation keeps an image-only candidate's empty text and so says
  "image and sentence" there (its training says "image"). Strings are fixed (not configurable).

``last_token`` (GME / VLM2Vec; causal, pooling reads the last token)::

    {system}<|im_start|>user\\n<image>{instruction} {text}<|im_end|>\\n<|im_start|>assistant\\n<|endoftext|>

``plain`` (no chat template)::

    <image>{instruction} {text}

Everything up to and including ``<|im_start|>assistant\\n`` is what the backbone's chat template
(``apply_chat_template(..., add_generation_prompt=True)``) renders for one user turn holding the image
and the text. Candidates get no instruction: then the markers and the separating space are left out.

Which U-MARVEL template: ``umarvel`` to train from a base Qwen2-VL without growing its vocabulary;
``umarvel_exact`` to evaluate or continue training U-MARVEL's released checkpoints (their embeddings were
learned with exactly these inputs) or to reproduce its inputs exactly. ``for_eval`` (evaluation form) only
changes ``umarvel_exact``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

TemplateName = Literal["umarvel", "umarvel_exact", "last_token", "plain"]
TEMPLATE_NAMES: tuple[str, ...] = ("umarvel", "umarvel_exact", "last_token", "plain")

#: Piece kinds that are exactly one special token.
TOKEN_KINDS = frozenset({"special", "image", "marker", "embed"})
#: Piece kinds made of ordinary text (tokenised).
TEXT_KINDS = frozenset({"scaffold", "instruction", "text"})

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
#: :attr:`TemplateSpec.system_prompt`'s default: the system turn the backbone's chat template adds to a
#: conversation without one (:attr:`mmret.models.backbone.Backbone.default_system_prompt`: Qwen2-VL's and
#: Qwen2.5-VL's "You are a helpful assistant.", none for Qwen3-VL), filled in by the processor.
CHAT_TEMPLATE_DEFAULT = "<the chat template's default>"

#: The tokens U-MARVEL's loader adds to the tokenizer, in the order it adds them (so their ids are
#: ``len(tokenizer)``, ``+1``, ``+2`` for a tokenizer that lacks all three).
UMARVEL_ADDED_TOKENS: tuple[str, ...] = ("<emb>", "<instruction_start>", "<instruction_end>")
#: ``umarvel_exact``'s fixed strings (U-MARVEL's ``prompt1`` suffixes carry the trailing space).
UMARVEL_EXACT_STRINGS: dict[str, str] = {
    "instruction_start": "<instruction_start>",
    "instruction_end": "<instruction_end>",
    "embed_token": "<emb>",
    "summary_suffix": "\nSummarize above {modality} in one word: ",
}

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
    may use ``{modality}``; ``system_prompt`` is the system turn's text, None for no system turn (the
    Qwen2-VL chat template would add its default one), or :data:`CHAT_TEMPLATE_DEFAULT` (the default) for
    what the backbone's chat template adds (:meth:`with_default_system`, which the processor applies).
    ``umarvel_exact`` sets these four strings itself (:data:`UMARVEL_EXACT_STRINGS`) and refuses other values.
    """

    name: TemplateName = "umarvel"
    system_prompt: str | None = CHAT_TEMPLATE_DEFAULT
    instruction_start: str = "<|object_ref_start|>"
    instruction_end: str = "<|object_ref_end|>"
    embed_token: str = "<|endoftext|>"
    summary_suffix: str = "\nSummarize above {modality} in one word:"

    def __post_init__(self) -> None:
        if self.name not in TEMPLATE_NAMES:
            raise ValueError(f"unknown template {self.name!r}; choose one of {list(TEMPLATE_NAMES)}")
        if self.name == "umarvel_exact":
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for field, exact in UMARVEL_EXACT_STRINGS.items():
                if getattr(self, field) not in (defaults[field], exact):
                    raise ValueError(f"umarvel_exact: {field} is fixed to {exact!r}, got {getattr(self, field)!r}")
                object.__setattr__(self, field, exact)

    def with_default_system(self, default: str | None) -> TemplateSpec:
        """This spec with :data:`CHAT_TEMPLATE_DEFAULT` replaced by ``default`` (the backbone's chat template's
        default system turn, None for none); an explicit ``system_prompt`` stays."""
        if self.system_prompt != CHAT_TEMPLATE_DEFAULT:
            return self
        return dataclasses.replace(self, system_prompt=default)

    def added_tokens(self) -> tuple[str, ...]:
        """Tokens the processor adds to a tokenizer that lacks them (in this order)."""
        return UMARVEL_ADDED_TOKENS if self.name == "umarvel_exact" else ()

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

    def render(
        self, *, instruction: str | None, text: str | None, has_image: bool, has_text: bool, for_eval: bool = False
    ) -> list[Piece]:
        """The prompt as pieces. ``has_text`` picks the summary wording (it stays put when truncation
        empties ``text``); empty strings count as absent. The image is one ``image`` piece (expanded later).
        ``for_eval``: the evaluation form (``umarvel_exact`` only; the other templates have one form).
        """
        user: list[Piece] = []
        if has_image:
            user += [Piece("special", VISION_START), Piece("image", IMAGE_PAD), Piece("special", VISION_END)]
        if self.name == "umarvel_exact":
            return self._render_exact(user, instruction, text, has_image, has_text, for_eval)
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
        pieces = self._chat_turns(user)
        pieces += [Piece("special", IM_START), Piece("scaffold", "assistant\n"), Piece("embed", self.embed_token)]
        return pieces

    def _chat_turns(self, user: list[Piece]) -> list[Piece]:
        """The system turn (unless ``system_prompt`` is None) and the user turn holding ``user``."""
        pieces: list[Piece] = []
        if self.system_prompt == CHAT_TEMPLATE_DEFAULT:
            raise ValueError(
                "TemplateSpec.system_prompt is the chat template's default: resolve it with with_default_system "
                "(the processor does, from its backbone)"
            )
        if self.system_prompt is not None:
            pieces += [
                Piece("special", IM_START),
                Piece("scaffold", "system\n" + self.system_prompt),
                Piece("special", IM_END),
                Piece("scaffold", "\n"),
            ]
        pieces += [Piece("special", IM_START), Piece("scaffold", "user\n"), *user, Piece("special", IM_END)]
        pieces.append(Piece("scaffold", "\n"))
        return pieces

    def _render_exact(
        self,
        user: list[Piece],
        instruction: str | None,
        text: str | None,
        has_image: bool,
        has_text: bool,
        for_eval: bool,
    ) -> list[Piece]:
        """``umarvel_exact`` (module docstring): ``user`` holds the image pieces already."""
        if instruction:
            # format_string(start + instruction + end + " " + raw): the "." lands after the end marker
            # when there is no query text (instruction already ends in one of .?!).
            user += [
                Piece("marker", self.instruction_start),
                Piece("instruction", instruction),
                Piece("marker", self.instruction_end),
                Piece("text", " " + text) if text else Piece("scaffold", "."),
            ]
            words = MODALITY_WORDS[(has_image, True)]  # the instruction counts as text
        else:
            if text:
                user.append(Piece("text", text))
            # U-MARVEL's CandidateDataset keeps an image-only candidate's empty text at evaluation.
            words = MODALITY_WORDS.get((has_image, has_text or (for_eval and has_image)), MODALITY_WORDS[(False, True)])
        user.append(Piece("scaffold", self.summary_suffix.format(modality=words)))
        pieces = self._chat_turns(user)
        pieces += [Piece("special", IM_START), Piece("scaffold", "assistant\n"), Piece("embed", self.embed_token)]
        pieces += [Piece("scaffold", "."), Piece("special", IM_END), Piece("scaffold", "\n")]
        if for_eval:  # add_generation_prompt=True after the assistant turn
            pieces += [Piece("special", IM_START), Piece("scaffold", "assistant\n")]
        return pieces


def render_string(pieces: list[Piece]) -> str:
    """The rendered prompt as one string (what a Hugging Face processor would be given)."""
    return "".join(p.text for p in pieces)
