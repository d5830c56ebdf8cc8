"""False negatives: unlabelled copies of a query's positives. The real M-BEIR release repeats content across
datasets and pools under different dids (OVEN / InfoSeek entity cards, repeated captions and images); mining
such a copy as a negative would teach the model to push away its own answer.

A candidate is a false negative of a query when, compared with a positive of the same modality,

* its *normalised text* equals the positive's: the formatted candidate text
  (:func:`mmret.data.mbeir.candidate_text`, UniIR's rule), case-folded, runs of whitespace collapsed to one
  space (empty text never matches), or
* its image's *decoded pixels* equal the positive's: the sha256 of the decoded RGB array together with its
  shape (so re-encoded or renamed copies match, a resized one does not).

Only candidates of the positive's modality are compared: a text-only candidate carrying the text of an
(image, text) positive is a different modality, not a copy (it is exactly MM-Embed's kind-a negative, and
M-BEIR's global scoring counts it as a miss). Keys are computed lazily, for the candidates the rules reach
and for the positives, and cached (image keys per image path: a shared picture is decoded once).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Mapping

import numpy as np
from PIL import Image

from mmret.data.bad_records import BAD_IMAGE, BadRecordError, BadRecords
from mmret.data.images import BadImageError
from mmret.data.mbeir import Candidate, candidate_text

TEXT = "text"
IMAGE = "image"

_SPACES = re.compile(r"\s+")


def normalise_text(candidate: Candidate) -> str:
    """The candidate's formatted text, case-folded, whitespace collapsed (``""`` for an image-only one)."""
    return _SPACES.sub(" ", candidate_text(candidate).casefold()).strip()


def pixel_key(image: Image.Image) -> str:
    """sha256 (hex) of the decoded RGB pixels and their shape."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    digest = hashlib.sha256(repr(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


class ContentKeys:
    """Cached content keys of candidates: normalised text per did, pixel key per image path.

    ``candidates``: did -> record (dids absent from it have no content: only their did identifies them).
    ``load_image(path)``: the decoded image (e.g. :func:`mmret.data.images.load_image` under the root, with
    its decode cap); a :class:`~mmret.data.images.BadImageError` goes to ``bad`` (``skip``: that image has
    no key and matches nothing). Counts what the filter found: ``by_text``, ``by_image``.
    """

    def __init__(
        self,
        candidates: Mapping[str, Candidate],
        load_image: Callable[[str], Image.Image],
        bad: BadRecords | None = None,
    ) -> None:
        self.candidates = candidates
        self.load_image = load_image
        self.bad = BadRecords("error") if bad is None else bad
        self._text: dict[str, str] = {}
        self._pixels: dict[str, str | None] = {}
        self.by_text = 0
        self.by_image = 0
        self.images_decoded = 0

    def text(self, did: str) -> str:
        if did not in self._text:
            cand = self.candidates.get(did)
            self._text[did] = normalise_text(cand) if cand is not None and cand.text is not None else ""
        return self._text[did]

    def pixels(self, did: str) -> str | None:
        cand = self.candidates.get(did)
        if cand is None or cand.image_path is None:
            return None
        path = cand.image_path
        if path not in self._pixels:
            try:
                self._pixels[path] = pixel_key(self.load_image(path))
                self.images_decoded += 1
            except BadImageError as e:
                self._pixels[path] = None
                self.bad.handle(BadRecordError(f"candidate {did}", BAD_IMAGE, str(e)))
        return self._pixels[path]

    def modality(self, did: str) -> str | None:
        cand = self.candidates.get(did)
        return None if cand is None else cand.modality

    def match(self, did: str, positive: str) -> str | None:
        """``"text"`` / ``"image"`` when ``did`` copies ``positive`` (same modality, see the module
        docstring), else None. The text is compared first (no image is decoded when it matches)."""
        modality = self.modality(did)
        if modality is None or modality != self.modality(positive):
            return None
        text = self.text(did)
        if text and text == self.text(positive):
            return TEXT
        pixels = self.pixels(positive)
        if pixels is not None and pixels == self.pixels(did):
            return IMAGE
        return None

    def checker(self, positives: Collection[str]) -> FalseNegatives:
        """The false-negative predicate of a query with these ``positives``."""
        return FalseNegatives(self, tuple(positives))


class FalseNegatives:
    """``checker(did)``: whether ``did`` copies one of the query's positives (counted in the keys'
    ``by_text`` / ``by_image``; the answer is cached per did, so a did asked twice counts once)."""

    def __init__(self, keys: ContentKeys, positives: tuple[str, ...]) -> None:
        self.keys = keys
        self.positives = positives
        self._answers: dict[str, bool] = {}

    def __call__(self, did: str) -> bool:
        if did not in self._answers:
            how = next((m for p in self.positives if (m := self.keys.match(did, p)) is not None), None)
            if how == TEXT:
                self.keys.by_text += 1
            elif how == IMAGE:
                self.keys.by_image += 1
            self._answers[did] = how is not None
        return self._answers[did]
