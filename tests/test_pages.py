"""The HTML pages of retrieval (mmret.eval.pages): what each page lists, checked against the qrels and pool
files read here, and the pages rendered in a real browser (headless Chromium) with every thumbnail loaded.

Chromium: Debian's ``chromium`` package (``.ci/run`` installs it). Under ``CI=true`` the browser test requires
it; elsewhere it is skipped when no browser is installed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import helpers
import pytest

from mmret.data.mbeir import local_pool_path
from mmret.eval.pages import sample, write_pages

TASKS = ("mscoco_task0", "webqa_task1", "cirr_task7")  # text -> image, text -> text, image+text -> image


def qrels(root: Path, task: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for line in (root / "qrels" / "test" / f"mbeir_{task}_test_qrels.txt").read_text().splitlines():
        qid, _, did, rel, *_ = line.split()
        if int(rel) > 0:
            out.setdefault(qid, set()).add(did)
    return out


def pool_lines(root: Path, task: str) -> dict[str, dict]:
    path = local_pool_path(root, task)
    return {(r := json.loads(line))["did"]: r for line in path.read_text().splitlines() if line.strip()}


def query_ids(root: Path, task: str) -> list[str]:
    path = root / "query" / "test" / f"mbeir_{task}_test.jsonl"
    return [json.loads(line)["qid"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pages(tiny_mbeir, tmp_path_factory):
    """Pages of a made-up ranking: every other query has its positive at rank 2, the rest none in the top 5;
    one candidate's image path is broken (a copy of the corpus)."""
    root = tmp_path_factory.mktemp("pages") / "mbeir"
    shutil.copytree(tiny_mbeir, root)
    results, positives, expected = {}, {}, {}
    for task in TASKS:
        pos = qrels(root, task)
        positives.update({q: tuple(sorted(d)) for q, d in pos.items()})
        others = [d for d in pool_lines(root, task) if not any(d in p for p in pos.values())]
        qids = query_ids(root, task)
        rankings = []
        for i, q in enumerate(qids):
            ranked = [d for d in others if d not in pos[q]][:5]
            if i % 2 == 0:
                ranked.insert(1, sorted(pos[q])[0])
            rankings.append(ranked[:5])
        results[task] = (qids, rankings, [[1.0 - 0.1 * r for r in range(5)]] * len(qids))
        expected[task] = dict(zip(qids, rankings, strict=True))
    # Break one image of the first ranking's third hit on mscoco_task0 (image candidates): not found on disk.
    broken = expected["mscoco_task0"][results["mscoco_task0"][0][0]][2]
    pool_file = local_pool_path(root, "mscoco_task0")
    lines = [json.loads(line) for line in pool_file.read_text().splitlines()]
    for rec in lines:
        if rec["did"] == broken:
            rec["img_path"] = "mbeir_images/missing.jpg"
    pool_file.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = root.parent / "out"
    out.mkdir()
    written = write_pages(out, root, "test", "local", results, positives, queries_per_task=6, top=5)
    return dict(root=root, out=out, written=written, expected=expected, positives=positives, broken=broken)


def test_one_page_per_task_lists_the_sampled_queries_and_marks_the_positives(pages):
    assert sorted(p.name for p in pages["written"]) == sorted(f"{t}.html" for t in TASKS)
    for task in TASKS:
        page = (pages["out"] / f"{task}.html").read_text()
        shown = re.findall(r"<b>query ([^<]+)</b>", page)
        qids = list(pages["expected"][task])
        assert shown == [qids[i] for i in sample(qids, 6)] and len(shown) == 6
        rows = re.findall(r'<tr class="(pos)?"><td>(\d)</td><td>[^<]*</td><td>([^<]+)<br>(positive)?</td>', page)
        assert len(rows) == 6 * 5
        for n, q in enumerate(shown):
            ranked = pages["expected"][task][q]
            mine = rows[5 * n : 5 * n + 5]
            assert [r[2] for r in mine] == ranked
            assert [bool(r[0]) for r in mine] == [d in pages["positives"][q] for d in ranked]
            assert [bool(r[3]) for r in mine] == [d in pages["positives"][q] for d in ranked]


def test_sample_is_seeded_and_bounded():
    qids = [f"9:{i}" for i in range(50)]
    assert sample(qids, 10) == sample(qids, 10) != sample(qids, 10, seed=1)
    assert len(sample(qids, 10)) == 10 and sample(qids, 100) == list(range(50))


def test_pages_render_in_headless_chromium_with_their_thumbnails(pages, tmp_path):
    for task in TASKS:
        page = pages["out"] / f"{task}.html"
        images = page.read_text().count("<img ")
        notes = page.read_text().count("unreadable image")
        loaded, total = helpers.thumbnails_loaded(page, tmp_path / task)
        assert loaded == total == images > 0  # every thumbnail decoded
        if task == "mscoco_task0":
            # the broken image shows as a note (each time it is a hit), not as a broken thumbnail
            assert notes == page.read_text().count(f"<td>{pages['broken']}<br>") > 0
