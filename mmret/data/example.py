"""The source-neutral example: what the pipelines render into tokens, whatever file a pair came from.

A source (M-BEIR: :mod:`mmret.data.sources.mbeir`; later a text-pair or a caption file) turns its
records into :class:`Part` s, one per query or candidate, with the text rules and the instruction draw
of that source already applied, and a query into an :class:`Example` naming its labelled candidates by
id. The pipelines then only render (:func:`encode_part`: instruction -> template -> tokens, image key ->
the store's image -> patches) and never look at a source's record types or tables: nothing here is
checked against M-BEIR's datasets or tasks.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmret.data.processor import ProcessedExample, Processor


@dataclasses.dataclass(frozen=True, slots=True)
class Part:
    """One query or candidate as the model reads it.

    ``text``: the model text, final (formatted by the source's rule; ``None``: none). ``image``: the
    key the store's ``image(key, max_pixels=...)`` resolves (M-BEIR: the path relative to the root;
    ``None``: no image). ``instruction``: the instruction put before the text (queries only; ``None``:
    none), final as well.
    """

    id: str
    text: str | None = None
    image: str | None = None
    instruction: str | None = None

    @property
    def modality(self) -> str:
        """``"text"``, ``"image"`` or ``"image,text"`` by what the part holds (the instruction aside);
        ``""`` for a part with neither (which the processor rejects)."""
        return ",".join(m for m, has in (("image", self.image is not None), ("text", bool(self.text))) if has)


@dataclasses.dataclass(frozen=True, slots=True)
class Example:
    """A query with its labelled candidates (ids of the same store's candidates).

    ``negatives``: the record's own hard negatives, ranked (a store's negatives file, when it has one,
    replaces them; see :class:`mmret.data.stores.Store`). ``task``: the task or source name the query
    belongs to (M-BEIR: ``"<dataset>_task<N>"``). ``where``: where the record was read (errors name it;
    not compared).
    """

    query: Part
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    task: str = ""
    where: str | None = dataclasses.field(default=None, compare=False)

    @property
    def id(self) -> str:
        return self.query.id


def encode_part(part: Part, processor: Processor, image: Any | None, *, for_eval: bool = False) -> ProcessedExample:
    """Render ``part`` with its decoded ``image`` (``None`` when it has none): the processor's template
    around the instruction and text, the image's patches. ``for_eval``: the template's evaluation form."""
    return processor(text=part.text, image=image, instruction=part.instruction, for_eval=for_eval)
