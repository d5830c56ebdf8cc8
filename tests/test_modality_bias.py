"""Modality bias (MM-Embed): the share of the top k whose modality is not the task's target, on the global
pool. The metric on hand-made rankings (shares worked out by hand), the report fields and tables, the
before/after comparison with a report that predates the field, and an evaluation of the tiny synthetic
corpus whose shares are recomputed here from its TREC files and the union pool file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mmret.data.mbeir import EVAL_TASKS, global_pool_path, read_qrels, read_queries
from mmret.eval import report
from mmret.eval.embed import shard_name, write_json
from mmret.eval.evaluate import candidate_modalities, evaluate
from mmret.eval.metrics import TaskResult, read_trec, wrong_modality_fractions, wrong_modality_share
from mmret.eval.run import _reusable, before_after

# ------------------------------------------------------------------------------------------- the metric

MOD = {"0:1": "image", "0:2": "text", "0:3": "image,text", "0:4": "image", "0:5": "text"}


def test_share_of_wrong_modalities_in_the_top_k():
    # top 5 of the first: image, text, image,text, image, image -> 2 wrong of 5 ("image,text" is not "image")
    # the second retrieved 2 (< k): text, image -> 1 of 2; the third nothing: no share, left out of the mean
    ranked = [["0:1", "0:2", "0:3", "0:4", "0:1", "0:5"], ["0:2", "0:1"], []]
    fractions = wrong_modality_fractions(ranked, "image", MOD, 5)
    assert fractions[:2].tolist() == [0.4, 0.5] and math.isnan(fractions[2])
    assert wrong_modality_share(ranked, "image", MOD, 5) == pytest.approx(45.0)  # (40 + 50) / 2
    assert wrong_modality_share(ranked, "image", MOD, 1) == pytest.approx(50.0)  # image | text
    assert wrong_modality_share(ranked, "image", MOD, 10) == pytest.approx((3 / 6 + 1 / 2) / 2 * 100)


def test_modalities_match_exactly_and_repeated_dids_take_their_slots():
    ranked = [["0:3", "0:1", "0:5", "0:3"]]
    assert wrong_modality_share(ranked, "image,text", MOD, 1) == 0.0
    assert wrong_modality_share(ranked, "image,text", MOD, 2) == 50.0
    assert wrong_modality_share(ranked, "text", MOD, 4) == 75.0  # 0:3 twice, 0:1: three of four not "text"
    assert wrong_modality_share([["0:2", "0:2", "0:1"]], "text", MOD, 3) == pytest.approx(100 / 3)


def test_share_errors():
    with pytest.raises(ValueError, match="k must be"):
        wrong_modality_share([["0:1"]], "image", MOD, 0)
    with pytest.raises(ValueError, match="target modality must be one of"):
        wrong_modality_share([["0:1"]], "text,image", MOD, 5)
    with pytest.raises(KeyError, match="'0:9' has no known modality"):
        wrong_modality_share([["0:1", "0:9"]], "image", MOD, 5)
    with pytest.raises(TypeError, match="string"):
        wrong_modality_share(["0:1"], "image", MOD, 5)
    with pytest.raises(ValueError, match="no retrieved candidates"):
        wrong_modality_share([[], []], "image", MOD, 5)


def test_candidate_modalities_keeps_the_wanted_first_lines(tmp_path):
    path = tmp_path / "pool.jsonl"
    lines = [
        {"did": "0:1", "modality": "image"},
        {"did": "0:2", "modality": "text"},
        {"did": "0:1", "modality": "text"},  # a repeated did: the first line wins, as read_pool has it
        {"did": "0:3", "modality": "image,text"},
    ]
    path.write_text("\n".join(map(json.dumps, lines)) + "\n{not json\n")
    assert candidate_modalities(path, {"0:1", "0:3", "0:7"}) == {"0:1": "image", "0:3": "image,text"}


# ------------------------------------------------------------------------------------------ the report

_RESULTS = {
    "visualnews_task0": TaskResult("visualnews_task0", 4, {1: 10.0, 5: 20.0, 10: 30.0}, wrong_modality=25.0),
    "fashion200k_task0": TaskResult("fashion200k_task0", 2, {1: 40.0, 5: 50.0, 10: 60.0}, wrong_modality=60.0),
}
_EXACT = {"global": {"method": "exact"}}


def _write(out: Path, results: dict[str, TaskResult] = _RESULTS, pool: str = "global", **kw) -> dict:
    return report.write_report(out, results=results, mbeir_root="r", pool=pool, checkpoint=None, search=_EXACT, **kw)


def test_report_holds_the_share_at_the_headline_k(tmp_path):
    got = _write(tmp_path)
    assert got["tasks"]["visualnews_task0"]["wrong_modality@5"] == 25.0
    assert got["tasks"]["fashion200k_task0"]["wrong_modality@10"] == 60.0
    assert "wrong_modality@5" not in got["tasks"]["fashion200k_task0"]
    assert got["wrong_modality_average"] == 42.5 and got["average"] == 40.0  # (25 + 60) / 2; recall unchanged
    assert report.read_report(tmp_path) == got
    md = (tmp_path / "report.md").read_text()
    assert f"| {report.WRONG_MODALITY_HEAD} |" in md and "lower is better" in report.WRONG_MODALITY_HEAD
    assert "| visualnews_task0 | 4 | 10.0 | 20.0 | 30.0 | 20.0 (R@5) | \u2013 | \u2013 | 25.0 |" in md
    assert "| **average (2 tasks)** | 6 |  |  |  | **40.0** | 48.9 | 60.7 | 42.5 |" in md


def test_report_without_shares_has_no_column_and_a_partial_set_is_an_error(tmp_path):
    plain = {n: TaskResult(r.task, r.num_queries, r.recall) for n, r in _RESULTS.items()}
    got = _write(tmp_path / "local", plain, pool="local")
    assert "wrong_modality_average" not in got and got["tasks"] == _write(tmp_path / "again", plain)["tasks"]
    assert not any("wrong_modality" in key for t in got["tasks"].values() for key in t)
    assert "wrong modality" not in (tmp_path / "local" / "report.md").read_text()
    with pytest.raises(ValueError, match="visualnews_task0: no wrong-modality share"):
        _write(tmp_path / "bad", {**_RESULTS, "visualnews_task0": plain["visualnews_task0"]})
    assert not (tmp_path / "bad").exists()


def _old(rep: dict) -> dict:
    """``rep`` as a report written before the wrong-modality field existed."""
    rep = json.loads(json.dumps(rep))
    rep.pop("wrong_modality_average")
    for t in rep["tasks"].values():
        t.pop(f"wrong_modality@{t['headline_k']}")
    return rep


def test_compare_table_shows_the_share_before_and_after(tmp_path):
    before = _write(tmp_path / "a")
    better = {
        n: TaskResult(r.task, r.num_queries, r.recall, wrong_modality=r.wrong_modality - 5 * (i + 1))
        for i, (n, r) in enumerate(_RESULTS.items())
    }
    after = _write(tmp_path / "b", better)  # visualnews 25 -> 20, fashion200k 60 -> 50, average 42.5 -> 35
    lines = report.compare_table(before, after).splitlines()
    assert lines[0] == (
        "| task | k | before | after | \u0394 | wrong modality % before | wrong modality % after | "
        "\u0394 (lower is better) |"
    )
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| visualnews_task0 | 5 | 20.0 | 20.0 | +0.0 | 25.0 | 20.0 | -5.0 |"
    assert lines[3] == "| fashion200k_task0 | 10 | 60.0 | 60.0 | +0.0 | 60.0 | 50.0 | -10.0 |"
    assert lines[4] == "| **average** | | 40.0 | 40.0 | +0.0 | 42.5 | 35.0 | -7.5 |"
    assert "lower is better" in lines[-1]
    # A report written before the field existed: "n/a" on its side, no difference.
    lines = report.compare_table(_old(before), after).splitlines()
    assert lines[2] == "| visualnews_task0 | 5 | 20.0 | 20.0 | +0.0 | n/a | 20.0 | \u2013 |"
    assert lines[4] == "| **average** | | 40.0 | 40.0 | +0.0 | n/a | 35.0 | \u2013 |"
    # Neither has it (two old reports, or local pools): the table as before, no extra columns.
    lines = report.compare_table(_old(before), _old(after)).splitlines()
    assert lines[0] == "| task | k | before | after | \u0394 |" and "wrong modality" not in "\n".join(lines)


def test_before_after_reads_an_old_report_and_an_old_global_report_is_redone(tmp_path):
    workdir = tmp_path / "run"
    old = _write(workdir / "eval" / "0" / "global", fingerprint={"pool": "global", "x": 1})
    (workdir / "eval" / "0" / "global" / "report.json").write_text(json.dumps(_old(old)))
    new = _write(workdir / "eval" / "7" / "global", fingerprint={"pool": "global", "x": 1})
    text = before_after(workdir, 0, 7, ("global",))
    assert "global pool, step 0 -> step 7:" in text
    assert "| visualnews_task0 | 5 | 20.0 | 20.0 | +0.0 | n/a | 25.0 | \u2013 |" in text
    assert "| task | k | step 0 | step 7 | \u0394 | wrong modality % step 0 | wrong modality % step 7 |" in text
    assert _reusable(workdir / "eval" / "7" / "global", new["fingerprint"])
    assert not _reusable(workdir / "eval" / "0" / "global", old["fingerprint"])  # no shares: made again
    plain = {n: TaskResult(r.task, r.num_queries, r.recall) for n, r in _RESULTS.items()}
    _write(workdir / "eval" / "0" / "local", plain, pool="local", fingerprint={"pool": "local"})
    assert _reusable(workdir / "eval" / "0" / "local", {"pool": "local"})  # a local report needs none


# ------------------------------------------------------------------ the tiny corpus, end to end (planted)

TASKS = [t.name for t in EVAL_TASKS]


def _union(root: Path) -> list[dict]:
    """The union pool file's records, read here with plain json (independent of mmret's readers)."""
    lines = global_pool_path(root).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def planted_global(root: Path, out: Path) -> Path:
    """An embeddings directory of the union pool (random unit vectors) and every task's test queries: even
    queries sit on a candidate of another modality than their task's target, odd ones on a positive."""
    rng = np.random.default_rng(0)
    union = _union(root)
    dids = [c["did"] for c in union]
    vectors = rng.normal(size=(len(dids), 32))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_json(out / "embeddings.json", {"split": "test", "dim": 32, "tasks": TASKS, "source": {"preset": "x"}})
    write_json(out / "pools" / "global" / "members.json", dids)
    groups = [("pools/global/extra", dids, vectors)]
    for task in EVAL_TASKS:
        qids = [q.qid for q in read_queries(root, "test", task.name)]
        positives = read_qrels(root, "test", task.name).positives
        wrong = [i for i, c in enumerate(union) if c["modality"] != task.cand_modality]
        target = [wrong[n % len(wrong)] if n % 2 == 0 else dids.index(positives[q][0]) for n, q in enumerate(qids)]
        queries = vectors[target] + 0.3 / np.sqrt(32) * rng.normal(size=(len(qids), 32))
        groups.append((f"queries/{task.name}", qids, queries / np.linalg.norm(queries, axis=1, keepdims=True)))
    for name, ids, vec in groups:
        write_json(out / name / "group.json", {"count": len(ids), "shards": 1})
        np.savez(out / name / shard_name(0), embeddings=vec.astype(np.float16), ids=np.asarray(ids))
    return out


def test_global_evaluation_reports_the_share_recomputed_from_its_trec_files(tiny_mbeir, tmp_path):
    got = evaluate(planted_global(tiny_mbeir, tmp_path / "emb"), tiny_mbeir, "global", tmp_path / "out", top=10)
    modality = {c["did"]: c["modality"] for c in reversed(_union(tiny_mbeir))}  # reversed: the first line wins
    shares = {}
    for task in EVAL_TASKS:
        k = 10 if task.dataset in ("fashion200k", "fashioniq") else 5
        run = read_trec(tmp_path / "out" / f"{task.name}.trec")
        per_query = [sum(modality[d] != task.cand_modality for d, _ in r[:k]) / len(r[:k]) for r in run.values()]
        assert len(per_query) == got["tasks"][task.name]["num_queries"] == 24
        shares[task.name] = 100 * sum(per_query) / len(per_query)
        assert got["tasks"][task.name][f"wrong_modality@{k}"] == pytest.approx(shares[task.name])
    assert got["wrong_modality_average"] == pytest.approx(sum(shares.values()) / len(shares))
    assert report.read_report(tmp_path / "out") == got
    # Not vacuous: half the queries sit on a wrong-modality candidate, the other half on a positive.
    assert all(0 < s < 100 for s in shares.values()) and len({round(s, 6) for s in shares.values()}) > 1
    md = (tmp_path / "out" / "report.md").read_text()
    cirr = got["tasks"]["cirr_task7"]
    assert f"| cirr_task7 | 24 | {cirr['recall@1']:.1f} |" in md and f"| {cirr['wrong_modality@5']:.1f} |\n" in md
    assert f"| {got['wrong_modality_average']:.1f} |\n" in md
