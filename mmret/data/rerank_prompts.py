"""Pointwise reranking prompts, as data: what a (query, candidate) pair reads like to the reranker.

One user turn of the backbone's chat template: the prompt's ``instruction``, then ``query_label``, the query's
image, the query's text (its retrieval instruction first, UniIR-formatted), then ``candidate_label``, the
candidate's image and text, with nothing between the parts (the chat template concatenates a message's items).
The assistant answers ``yes`` or ``no``, one token each; the score is the softmax over those two tokens' logits
at the first answer position (:mod:`mmret.models.reranker`).

``umarvel`` is U-MARVEL's prompt, inherited from LamRA, character for character as its datasets build it
(``dataset/datasets_mbeir_rerank_only_pointwise.py``, ``datasets_mbeir_eval_rerank.py``): the string is
continued with a backslash inside the literal, so the 24 spaces of the next line's indentation stand between
"candidate" and "meets", and the second clause keeps its typo "responed". A checkpoint trained by U-MARVEL
scores as intended only with this exact text. ``mmembed`` is MM-Embed's zero-shot prompt as the paper
describes it (does the candidate match the query? True or False; its code is not public, so the wording
here is ours), scored by P(True).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RerankPrompt:
    """A pointwise prompt; ``yes`` / ``no`` are the answers (each must be one token of the tokenizer)."""

    name: str
    instruction: str
    query_label: str
    candidate_label: str
    yes: str
    no: str


#: U-MARVEL's (and LamRA's) Yes/No prompt, exactly (see the module docstring).
UMARVEL = RerankPrompt(
    name="umarvel",
    instruction=(
        "I will provide you with a query and a candidate. Please evaluate whether the candidate"
        + " " * 24
        + "meets the requirements of the query. If it does, respond with 'Yes'; if it doesn't, responed with 'No'."
    ),
    query_label="Query:",
    candidate_label="Candidate:",
    yes="Yes",
    no="No",
)

#: MM-Embed's zero-shot True/False prompt (the paper's description; see the module docstring).
MMEMBED = RerankPrompt(
    name="mmembed",
    instruction=(
        "I will provide you with a query and a candidate. Does the candidate match the query? Answer 'True' or 'False'."
    ),
    query_label="Query:",
    candidate_label="Candidate:",
    yes="True",
    no="False",
)

PROMPTS: dict[str, RerankPrompt] = {p.name: p for p in (UMARVEL, MMEMBED)}


def get_prompt(name: str) -> RerankPrompt:
    """The prompt called ``name``; ``ValueError`` naming the known ones."""
    if name not in PROMPTS:
        raise ValueError(f"rerank prompt must be one of {sorted(PROMPTS)}, got {name!r}")
    return PROMPTS[name]
