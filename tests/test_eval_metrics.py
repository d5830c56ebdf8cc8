"""The M-BEIR metric (hit@k, Recall@k, every qrels positive counts, headline k, average), TREC run files,
the published numbers and the evaluation report. Expected values are worked out by hand."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from mmret.data.mbeir import EVAL_TASKS, DatasetTask
from mmret.eval import metrics, published, report
from mmret.eval.metrics import TaskResult, average, evaluate_task, hits_at_k, read_trec, recall_at_k, write_trec

# ------------------------------------------------------------------------------------------ hits / recall


def test_hits_follow_the_given_order_not_scores():
    # "9:1" and "9:2" tie in score; the ranking given is what counts.
    assert hits_at_k([["9:1", "9:2"], ["9:2", "9:1"]], [{"9:2"}, {"9:2"}], 1).tolist() == [0.0, 1.0]
    assert hits_at_k([["9:1", "9:2"]], [{"9:2"}], 2).tolist() == [1.0]


def test_duplicate_positives_count_once():
    hits = hits_at_k([["9:2", "9:5"], ["9:7"]], [["9:2", "9:2"], ["9:3", "9:3"]], 5)
    assert hits.dtype == np.float64 and hits.tolist() == [1.0, 0.0]
    assert recall_at_k([["9:2", "9:5"], ["9:7"]], [["9:2", "9:2"], ["9:3", "9:3"]], 5) == 50.0


def test_duplicate_dids_in_a_ranking_count_once_but_take_their_slot():
    assert hits_at_k([["9:2", "9:2", "9:2"]], [{"9:2"}], 3).tolist() == [1.0]
    assert hits_at_k([["9:1", "9:1", "9:2"]], [{"9:2"}], 2).tolist() == [0.0]
    assert hits_at_k([["9:1", "9:1", "9:2"]], [{"9:2"}], 3).tolist() == [1.0]


def test_positive_outside_top_k():
    ranking = [["9:1", "9:2", "9:3", "9:4", "9:5", "9:6", "9:99"]]  # the positive at rank 7
    assert [hits_at_k(ranking, [{"9:99"}], k)[0] for k in (1, 5, 6, 7, 10)] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_k_beyond_the_ranking_and_empty_rankings():
    assert hits_at_k([["9:1"], []], [{"9:1"}, {"9:1"}], 10).tolist() == [1.0, 0.0]


def test_a_query_without_positives_scores_zero_and_stays_in_the_mean():
    assert hits_at_k([["9:1"], ["9:1"]], [{"9:1"}, set()], 1).tolist() == [1.0, 0.0]
    assert recall_at_k([["9:1"], ["9:1"]], [{"9:1"}, set()], 1) == 50.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        hits_at_k([["9:1"]], [{"9:1"}], 0)
    with pytest.raises(ValueError, match="2 rankings but 1"):
        hits_at_k([["9:1"], ["9:2"]], [{"9:1"}], 1)
    with pytest.raises(TypeError, match="string"):
        hits_at_k(["9:1"], [{"9:1"}], 1)  # a ranking must be a list of dids, not one did
    with pytest.raises(ValueError, match="no queries"):
        recall_at_k([], [], 1)


# ------------------------------------------------------------------------------------------ evaluate_task


def test_evaluate_task_recall_at_1_5_10():
    qids = ["9:1", "9:2", "9:3"]
    others = [f"9:{100 + i}" for i in range(9)]
    ranked = [
        ["9:11", *others],  # positive at rank 1
        [*others[:2], "9:12", *others[2:]],  # rank 3
        [*others[:6], "9:13", *others[6:]],  # rank 7
    ]
    pos = {"9:1": ["9:11"], "9:2": ("9:12",), "9:3": {"9:13"}, "9:4": ["9:14"]}  # 9:4 unused: ignored
    r = evaluate_task("mscoco_task0", qids, ranked, pos)
    assert r.task == "mscoco_task0" and r.num_queries == 3
    assert r.recall == pytest.approx({1: 100 / 3, 5: 200 / 3, 10: 100.0})
    assert r.headline_k == 5 and r.headline == pytest.approx(200 / 3)
    assert evaluate_task(DatasetTask("mscoco", 0), qids, ranked, pos) == r


def test_every_qrels_positive_counts_oven_and_infoseek_included():
    # UniIR's retriever scores with every qrels positive: OVEN's (5) InfoSeek (6) copy at rank 1 is a hit.
    r = evaluate_task("oven_task6", ["5:1"], [["6:7", "5:3", "5:4", "5:5", "5:6", "5:9"]], {"5:1": ["6:7", "5:9"]})
    assert r.recall == {1: 100.0, 5: 100.0, 10: 100.0}
    # InfoSeek (6) with only an OVEN positive: retrieving it is a hit.
    r = evaluate_task("infoseek_task8", ["6:1"], [["5:3"]], {"6:1": ["5:3"]})
    assert r.recall == {1: 100.0, 5: 100.0, 10: 100.0}
    # The own-dataset positive at rank 6 alone counts at 10 only.
    r = evaluate_task("oven_task6", ["5:1"], [["5:2", "5:3", "5:4", "5:5", "5:6", "5:9"]], {"5:1": ["6:7", "5:9"]})
    assert r.recall == {1: 0.0, 5: 0.0, 10: 100.0}
    r = evaluate_task("webqa_task1", ["2:1"], [["6:7"]], {"2:1": ["6:7"]})
    assert r.recall == {1: 100.0, 5: 100.0, 10: 100.0}


def test_evaluate_task_errors_name_the_task_and_query():
    with pytest.raises(KeyError, match=r"cirr_task7.*'8:2'"):
        evaluate_task("cirr_task7", ["8:1", "8:2"], [["8:5"], ["8:5"]], {"8:1": ["8:5"]})
    with pytest.raises(ValueError, match=r"cirr_task7.*'8:1' appears twice"):
        evaluate_task("cirr_task7", ["8:1", "8:1"], [["8:5"], ["8:5"]], {"8:1": ["8:5"]})
    with pytest.raises(ValueError, match=r"cirr_task7.*'9:1' is not from dataset cirr"):
        evaluate_task("cirr_task7", ["9:1"], [["8:5"]], {"9:1": ["8:5"]})
    with pytest.raises(ValueError, match="1 qids but 2 rankings"):
        evaluate_task("cirr_task7", ["8:1"], [["8:5"], ["8:5"]], {"8:1": ["8:5"]})
    with pytest.raises(ValueError, match="no queries"):
        evaluate_task("cirr_task7", [], [], {})
    with pytest.raises(ValueError, match=r"cirr_task7: query '8:1' has no positives"):  # UniIR asserts
        evaluate_task("cirr_task7", ["8:1"], [["8:5"]], {"8:1": []})


@pytest.mark.parametrize(
    ("task", "k"),
    [("fashion200k_task0", 10), ("fashion200k_task3", 10), ("fashioniq_task7", 10), ("cirr_task7", 5)]
    + [("visualnews_task0", 5), ("webqa_task2", 5), ("oven_task8", 5)],
)
def test_headline_k(task, k):
    r = TaskResult(task, 1, {1: 1.0, 5: 5.0, 10: 10.0})
    assert r.headline_k == k and r.headline == float(k)


def test_average_is_the_plain_mean_of_headlines():
    results = {
        "mscoco_task0": TaskResult("mscoco_task0", 3, {1: 10.0, 5: 20.0, 10: 30.0}),  # headline R@5 = 20
        "fashion200k_task0": TaskResult("fashion200k_task0", 2, {1: 40.0, 5: 50.0, 10: 60.0}),  # R@10 = 60
    }
    assert average(results) == 40.0
    with pytest.raises(ValueError):
        average({})


# ---------------------------------------------------------------------------------------------------- TREC


def test_trec_line_format_rank_numbering_and_top_cut(tmp_path):
    path = tmp_path / "run.trec"
    ranked = [["9:10", "9:11", "9:12"], ["9:20", "9:21"]]
    scores = [[0.9, 0.5, 0.5], [np.float32(0.25), -1.0]]  # a tie is fine
    write_trec(path, ["9:1", "9:2"], ranked, scores, tag="run1", top=2)
    assert path.read_text() == (
        "9:1 Q0 9:10 1 0.9 run1\n9:1 Q0 9:11 2 0.5 run1\n9:2 Q0 9:20 1 0.25 run1\n9:2 Q0 9:21 2 -1.0 run1\n"
    )
    assert read_trec(path) == {"9:1": [("9:10", 0.9), ("9:11", 0.5)], "9:2": [("9:20", 0.25), ("9:21", -1.0)]}


def test_trec_round_trip_is_exact(tmp_path):
    path = tmp_path / "run.trec"
    scores = [[0.123456789012345, 1e-30, -3.5], [np.float32(0.1)]]
    write_trec(path, ["0:1", "0:2"], [["0:5", "0:6", "0:7"], ["0:8"]], scores, tag="t", top=50)
    assert read_trec(path) == {
        "0:1": [("0:5", 0.123456789012345), ("0:6", 1e-30), ("0:7", -3.5)],
        "0:2": [("0:8", 0.1)],
    }


def test_read_trec_orders_by_the_rank_column(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("9:1 Q0 9:12 2 0.4 x\n9:1 Q0 9:11 1 0.7 x\n\n")
    assert read_trec(path) == {"9:1": [("9:11", 0.7), ("9:12", 0.4)]}


def test_trec_rejects_bad_runs_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "run.trec"
    write_trec(path, ["9:1"], [["9:5"]], [[1.0]], tag="ok")
    with pytest.raises(ValueError, match="above the one before"):
        write_trec(path, ["9:1"], [["9:5", "9:6"]], [[0.1, 0.2]], tag="ok")
    with pytest.raises(ValueError, match="whitespace"):
        write_trec(path, ["9:1"], [["9:5"]], [[1.0]], tag="my run")
    with pytest.raises(ValueError, match="2 dids but 1 scores"):
        write_trec(path, ["9:1"], [["9:5", "9:6"]], [[1.0]], tag="ok")
    assert path.read_text() == "9:1 Q0 9:5 1 1.0 ok\n"


def test_write_atomic_leaves_the_old_file_on_a_failed_rename(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    metrics.write_atomic(path, b"old")

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        metrics.write_atomic(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.txt"]


# ----------------------------------------------------------------------------------------------- published


@pytest.mark.parametrize(("system", "avg"), [(published.UNIIR_CLIP_SF, 50.6), (published.U_MARVEL, 63.2)])
def test_published_per_task_means_match_the_stated_averages(system, avg):
    assert list(system.local) == [t.name for t in EVAL_TASKS]
    assert abs(sum(system.local.values()) / 16 - avg) <= 0.05
    assert system.local_avg == avg


def test_published_table():
    assert published.SYSTEMS["UniIR CLIP_SF"].average("global") == 48.9
    assert published.SYSTEMS["U-MARVEL"].average("global") == 60.7
    assert published.SYSTEMS["MM-Embed"].average("local") is None
    assert published.U_MARVEL.local["fashioniq_task7"] == 36.4 and published.UNIIR_CLIP_SF.local["nights_task4"] == 32.0
    assert len(published.SYSTEMS) == 7


# -------------------------------------------------------------------------------------------------- report

_TWO = {  # given out of paper order on purpose
    "fashion200k_task0": TaskResult("fashion200k_task0", 2, {1: 40.0, 5: 50.0, 10: 60.0}),
    "visualnews_task0": TaskResult("visualnews_task0", 4, {1: 10.0, 5: 20.0, 10: 30.0}),
}
_EXACT = {"fashion200k_task0": {"method": "exact"}, "visualnews_task0": {"method": "exact"}}


def test_report_json(tmp_path):
    got = report.write_report(
        tmp_path,
        results=_TWO,
        mbeir_root="/data/mbeir",
        pool="local",
        checkpoint="ckpt/100",
        search=_EXACT,
        extra={"seed": 0},
    )
    assert got == {
        "mbeir_root": "/data/mbeir",
        "pool": "local",
        "checkpoint": "ckpt/100",
        "units": "percent",
        "tasks": {
            "visualnews_task0": {
                "recall@1": 10.0,
                "recall@5": 20.0,
                "recall@10": 30.0,
                "num_queries": 4,
                "headline_k": 5,
                "headline": 20.0,
            },
            "fashion200k_task0": {
                "recall@1": 40.0,
                "recall@5": 50.0,
                "recall@10": 60.0,
                "num_queries": 2,
                "headline_k": 10,
                "headline": 60.0,
            },
        },
        "average": 40.0,
        "complete": False,
        "search": _EXACT,
        "skipped": {},
        "extra": {"seed": 0},
    }
    assert list(got["tasks"]) == ["visualnews_task0", "fashion200k_task0"]  # paper order
    assert json.loads((tmp_path / "report.json").read_text()) == got == report.read_report(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md", "report.png"]  # no temp files left


def test_report_md_local_has_the_published_numbers(tmp_path):
    report.write_report(tmp_path, results=_TWO, mbeir_root="/data/mbeir", pool="local", checkpoint=None, search=_EXACT)
    md = (tmp_path / "report.md").read_text()
    assert "| visualnews_task0 | 4 | 10.0 | 20.0 | 30.0 | 20.0 (R@5) | 42.6 | 47.3 |" in md
    assert "| fashion200k_task0 | 2 | 40.0 | 50.0 | 60.0 | 60.0 (R@10) | 18.0 | 33.6 |" in md
    # over the same two tasks: UniIR (42.6 + 18.0) / 2 = 30.3, U-MARVEL (47.3 + 33.6) / 2 = 40.45
    assert "| **average (2 tasks)** | 6 |  |  |  | **40.0** | 30.3 | 40.5 |" in md
    assert md.index("visualnews_task0") < md.index("fashion200k_task0")


def test_report_md_global_has_only_the_averages(tmp_path):
    report.write_report(tmp_path, results=_TWO, mbeir_root="/data/mbeir", pool="global", checkpoint="c", search=_EXACT)
    md = (tmp_path / "report.md").read_text()
    assert "| visualnews_task0 | 4 | 10.0 | 20.0 | 30.0 | 20.0 (R@5) | \u2013 | \u2013 |" in md
    assert "| **average (2 tasks)** | 6 |  |  |  | **40.0** | 48.9 | 60.7 |" in md
    assert "42.6" not in md


def test_complete_report_uses_the_published_averages(tmp_path):
    results = {t.name: TaskResult(t.name, 1, {1: 0.0, 5: 50.0, 10: 50.0}) for t in EVAL_TASKS}
    got = report.write_report(tmp_path, results=results, mbeir_root="r", pool="local", checkpoint=None, search=_EXACT)
    assert got["complete"] is True and got["average"] == 50.0 and list(got["tasks"]) == [t.name for t in EVAL_TASKS]
    assert "| **average** | 16 |  |  |  | **50.0** | 50.6 | 63.2 |" in (tmp_path / "report.md").read_text()


def test_report_names_the_search_and_scann_agreement(tmp_path):
    scann = {"method": "scann", "params": {"num_leaves": 20, "reorder": 100}}
    agreement = {"k": 5, "queries": 4, "recall_scann": 25.0, "recall_exact": 50.0, "difference": -25.0}
    search = {
        "visualnews_task0": {**scann, "agreement": {"visualnews_task0": {**agreement, "neighbour_recall@10": 0.9}}},
        "fashion200k_task0": {"method": "exact"},
    }
    got = report.write_report(tmp_path, results=_TWO, mbeir_root="r", pool="local", checkpoint=None, search=search,
                              check_exact=4)  # fmt: skip
    assert got["search"]["visualnews_task0"]["check_exact"] == 4 and got["search"]["fashion200k_task0"] == {
        "method": "exact"
    }
    md = (tmp_path / "report.md").read_text()
    assert "- search: exact (1 of 2 indexes), ScaNN (1 of 2 indexes)" in md
    assert "- exact search (inner product, all candidates): fashion200k_task0" in md
    assert "- visualnews_task0: ScaNN (num_leaves=20, reorder=100)" in md
    assert "| visualnews_task0 | visualnews_task0 | 4 | R@5 | 25.0 | 50.0 | -25.0 | 0.9000 |" in md
    # ScaNN and no sample: said so in both files.
    got = report.write_report(tmp_path, results=_TWO, mbeir_root="r", pool="local", checkpoint=None,
                              search={"visualnews_task0": scann})  # fmt: skip
    assert got["search"]["visualnews_task0"]["agreement"] is None
    assert got["search"]["visualnews_task0"]["agreement_note"] == "not measured (eval.check_exact = 0)"
    assert "agreement with exact search: not measured (eval.check_exact = 0)" in (tmp_path / "report.md").read_text()
    for bad, match in (({}, "no search named"), ({"x": {"method": "fast"}}, "method must be"), (search, "no agree")):
        with pytest.raises(ValueError, match=match):
            report.write_report(tmp_path / "bad", results=_TWO, mbeir_root="r", pool="local", checkpoint=None,
                                search={**bad, "visualnews_task0": scann} if match == "no agree" else bad,
                                check_exact=4)  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_skipped_queries_make_a_report_of_16_tasks_incomplete(tmp_path):
    results = {t.name: TaskResult(t.name, 1, {1: 0.0, 5: 50.0, 10: 50.0}) for t in EVAL_TASKS}
    skipped = {"queries": {"cirr_task7": {"count": 2, "reasons": {"positive_not_in_pool": 2}, "examples": ["f:3: x"]}}}
    got = report.write_report(tmp_path, results=results, mbeir_root="r", pool="local", checkpoint=None,
                              search=_EXACT, skipped=skipped)  # fmt: skip
    assert got["complete"] is False and got["skipped"] == skipped
    md = (tmp_path / "report.md").read_text()
    assert "- tasks: 16 of 16 evaluated dataset-tasks (not complete: 2 test queries skipped)" in md
    assert "| **average (16 tasks, 2 queries skipped)** |" in md
    assert "- cirr_task7: 2 test queries dropped (positive_not_in_pool 2)\n  - e.g. f:3: x" in md


@pytest.mark.parametrize("pool", ["local", "global"])
def test_report_png_is_a_png(tmp_path, pool):
    report.write_report(tmp_path, results=_TWO, mbeir_root="r", pool=pool, checkpoint=None, search=_EXACT)
    data = (tmp_path / "report.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(tmp_path / "report.png") as im:
        im.verify()
    with Image.open(tmp_path / "report.png") as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_report_errors_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="pool"):
        report.write_report(tmp_path, results=_TWO, mbeir_root="r", pool="union", checkpoint=None, search=_EXACT)
    with pytest.raises(ValueError, match="is the result of"):
        report.write_report(tmp_path, results={"cirr_task7": _TWO["visualnews_task0"]}, mbeir_root="r", pool="local",
                            checkpoint=None, search=_EXACT)  # fmt: skip
    with pytest.raises(TypeError):
        report.write_report(
            tmp_path, results=_TWO, mbeir_root="r", pool="local", checkpoint=None, search=_EXACT, extra={"x": object()}
        )
    assert os.listdir(tmp_path) == []


def _headlines(pool: str, average_: float, **headlines: float) -> dict:
    """A report dict (only what compare_table reads)."""
    tasks = {n: {"headline": v, "headline_k": 10 if n.startswith("fashion") else 5} for n, v in headlines.items()}
    return {"pool": pool, "tasks": tasks, "average": average_}


def test_compare_table():
    before = _headlines("local", 40.0, fashion200k_task0=60.0, visualnews_task0=20.0)
    after = _headlines("local", 42.0, fashion200k_task0=58.0, visualnews_task0=26.0)
    table = report.compare_table(before, after, labels=("untrained", "trained"))
    assert table.splitlines() == [
        "| task | k | untrained | trained | \u0394 |",
        "|---|---:|---:|---:|---:|",
        "| visualnews_task0 | 5 | 20.0 | 26.0 | +6.0 |",
        "| fashion200k_task0 | 10 | 60.0 | 58.0 | -2.0 |",
        "| **average** | | 40.0 | 42.0 | +2.0 |",
    ]


def test_compare_table_with_a_missing_task_and_another_pool():
    before = _headlines("local", 20.0, visualnews_task0=20.0)
    after = _headlines("global", 30.0, visualnews_task0=20.04, cirr_task7=40.0)
    lines = report.compare_table(before, after).splitlines()
    assert "| visualnews_task0 | 5 | 20.0 | 20.0 | +0.0 |" in lines
    assert "| cirr_task7 | 5 | \u2013 | 40.0 | \u2013 |" in lines
    assert "| **average** | | 20.0 | 30.0 | +10.0 |" in lines
    assert "pools differ" in lines[-1] and "task sets differ" in lines[-1]
