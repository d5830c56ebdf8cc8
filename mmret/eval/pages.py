"""Retrieval you can look at: one self-contained HTML page per evaluated task, beside ``report.md``.

``<pool dir>/<task>.html`` shows a seeded sample of the task's queries (their text and image), each with its
top hits (rank, score, candidate id, thumbnail, text) and whether each hit is a positive (UniIR's rule: in the
query's qrels). Thumbnails are small JPEGs inlined as data URIs, so a page opens anywhere (a laptop, a
notebook, a bucket's browser) without the dataset; an image that cannot be read shows as a note instead. A
line at the bottom counts the thumbnails the browser loaded (``data-loaded`` on ``<body>``, set by a short
inline script), which tests read in a headless browser.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

from mmret.atomic_dir import PathLike, as_path, write_atomic
from mmret.data.bad_records import BadRecords
from mmret.data.images import BadImageError, load_image
from mmret.data.mbeir import Candidate, Query, global_pool_path, read_local_pool, read_pool, read_queries

#: Longest side of a thumbnail, in pixels; the decode cap of an image read for one.
THUMBNAIL, DECODE_CAP = 128, 8192 * 8192

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin-bottom:2em}
td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;font-size:13px;max-width:260px}
th{background:#f3f3f3}
tr.pos td{background:#e6f4e6}
img{max-width:128px;max-height:128px;display:block}
.q{background:#eef2fb}
.note{color:#888;font-style:italic}
"""

#: Counts the loaded thumbnails once the page has loaded (``naturalWidth`` > 0 for an image that decoded).
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-loaded', ok + '/' + imgs.length);
  document.getElementById('loaded').textContent = ok + ' of ' + imgs.length + ' thumbnails loaded';
});
"""


def sample(qids: Sequence[str], n: int, seed: int = 0) -> list[int]:
    """Indices of ``n`` of ``qids`` (all when fewer), chosen by a seeded hash of each qid, in file order."""
    key = {i: hashlib.blake2b(f"{seed}\x00{q}".encode(), digest_size=8).digest() for i, q in enumerate(qids)}
    return sorted(sorted(key, key=key.__getitem__)[:n])


def thumbnail(root: PathLike, rel_path: str) -> str | None:
    """A data URI of the image at ``root / rel_path`` shrunk to :data:`THUMBNAIL` pixels (None: unreadable)."""
    try:
        image = load_image(root, rel_path, max_pixels=DECODE_CAP)
    except BadImageError:
        return None
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _cell(root: PathLike, text: str | None, image_path: str | None) -> str:
    parts = []
    if image_path:
        uri = thumbnail(root, image_path)
        alt = html.escape(image_path)
        parts.append(f'<img src="{uri}" alt="{alt}">' if uri else f'<span class="note">unreadable image {alt}</span>')
    if text:
        parts.append(html.escape(text))
    return "<br>".join(parts) or '<span class="note">(empty)</span>'


def task_page(
    root: PathLike,
    task: str,
    pool: str,
    queries: Sequence[Query],
    rankings: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    positives: Mapping[str, Sequence[str]],
    candidates: Mapping[str, Candidate],
    *,
    top: int = 5,
) -> str:
    """The page's HTML for ``queries`` and their ``rankings`` / ``scores`` (candidate ids, best first)."""
    rows = []
    for q, ranked, score in zip(queries, rankings, scores, strict=True):
        pos = set(positives.get(q.qid, ()))
        hits = sum(d in pos for d in ranked[:top])
        rows.append(
            f'<tr class="q"><td colspan="4"><b>query {html.escape(q.qid)}</b> ({html.escape(q.modality)}; '
            f"{hits} of the top {top} are positives)<br>{_cell(root, q.text, q.image_path)}</td></tr>"
        )
        for rank, (did, s) in enumerate(zip(ranked[:top], score[:top], strict=False), 1):
            c = candidates.get(did)
            body = _cell(root, c.text, c.image_path) if c else '<span class="note">not in the pool file</span>'
            mark = "positive" if did in pos else ""
            rows.append(
                f'<tr class="{"pos" if did in pos else ""}"><td>{rank}</td><td>{s:.4f}</td>'
                f"<td>{html.escape(did)}<br>{mark}</td><td>{body}</td></tr>"
            )
    title = f"{html.escape(task)}: {pool} pool, top {top}"
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title><style>{_STYLE}</style></head>\n'
        f"<body><h1>{title}</h1><p>{len(queries)} sampled queries; green rows are positives.</p>\n"
        "<table><tr><th>rank</th><th>score</th><th>candidate</th><th>content</th></tr>\n"
        + "\n".join(rows)
        + f'\n</table><p id="loaded" class="note"></p><script>{_SCRIPT}</script></body></html>\n'
    )


def write_pages(
    out: PathLike,
    root: PathLike,
    split: str,
    pool: str,
    results: Mapping[str, tuple[Sequence[str], Sequence[Sequence[str]], Sequence[Sequence[float]]]],
    positives: Mapping[str, Sequence[str]],
    *,
    queries_per_task: int = 20,
    top: int = 5,
    seed: int = 0,
) -> list[Any]:
    """Write ``out/<task>.html`` for each task of ``results`` (task -> (qids, rankings, scores)); the paths."""
    if queries_per_task <= 0 or not results:
        return []
    bad = BadRecords("skip")
    global_pool = read_pool(global_pool_path(root, split), bad=bad) if pool == "global" else None
    written = []
    for task, (qids, rankings, scores) in results.items():
        chosen = sample(qids, queries_per_task, seed)
        by_qid = {q.qid: q for q in read_queries(root, split, task, bad=bad)}
        keep = [i for i in chosen if qids[i] in by_qid]
        candidates = global_pool if global_pool is not None else read_local_pool(root, task, split, bad=bad)
        page = task_page(
            root,
            task,
            pool,
            [by_qid[qids[i]] for i in keep],
            [rankings[i] for i in keep],
            [scores[i] for i in keep],
            positives,
            candidates,
            top=top,
        )
        path = as_path(out) / f"{task}.html"
        write_atomic(path, page.encode())
        written.append(path)
    return written
