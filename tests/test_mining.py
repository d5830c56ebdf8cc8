"""Hard-negative mining: the rules on hand-made rankings, the false-negative filter, and mine() on the tiny
synthetic corpus checked against rankings and rules recomputed here from the embeddings it wrote."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import eval_trainer_config, load_tool, uniir_format_string, with_pools_of
from PIL import Image

from mmret.data.bad_records import BadRecordError, BadRecords
from mmret.data.images import load_image
from mmret.data.mbeir import Candidate, read_global_pool
from mmret.data.negatives import read_negatives, write_negatives
from mmret.mining.false_negatives import ContentKeys, normalise_text
from mmret.mining.rules import Negative, mmembed, query_rng, random_fill, target_share, umarvel
from mmret.recipe import MiningConfig, SearchConfig, config_to_json

# ================================================================================================ rules


def hard(did: str, rank: int, score: float) -> Negative:
    return Negative(did, rank, score, "hard")


RANKED = ["1:1", "1:2", "1:3", "1:4", "1:5", "1:6"]
SCORES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]


def test_umarvel_skips_positives_and_false_negatives():
    got = umarvel(RANKED, SCORES, positives={"1:2", "1:5"}, n=3, pool=RANKED, rng=query_rng(0, "q"))
    assert got == [hard("1:1", 1, 0.9), hard("1:3", 3, 0.7), hard("1:4", 4, 0.6)]
    got = umarvel(
        RANKED,
        SCORES,
        positives={"1:2"},
        n=3,
        pool=RANKED,
        rng=query_rng(0, "q"),
        is_false_negative={"1:3"}.__contains__,
    )
    assert got == [hard("1:1", 1, 0.9), hard("1:4", 4, 0.6), hard("1:5", 5, 0.5)]


def test_ties_keep_the_retrieved_order():
    got = umarvel(["1:7", "1:3", "1:5"], [0.5, 0.5, 0.5], positives=set(), n=2, pool=[], rng=query_rng(0, "q"))
    assert [x.did for x in got] == ["1:7", "1:3"]


def test_umarvel_falls_back_to_random_pool_candidates():
    pool = ["1:1", "1:2", "1:3", "1:4", "1:8", "1:9"]
    got = umarvel(
        ["1:1", "1:2"],
        [0.9, 0.8],
        positives={"1:2", "1:8"},
        n=3,
        pool=pool,
        rng=query_rng(0, "7:1"),
        is_false_negative={"1:9"}.__contains__,
    )
    assert got[0] == hard("1:1", 1, 0.9)
    # the rest: pool candidates neither retrieved (1:1, 1:2), nor positive (1:8), nor false negative (1:9)
    assert sorted(x.did for x in got[1:]) == ["1:3", "1:4"]
    assert all(x.rank == 0 and x.score is None and x.kind == "random" for x in got[1:])
    # a pool too small: fewer negatives, no repeats
    short = umarvel(["1:1"], [0.9], positives={"1:2"}, n=5, pool=pool[:4], rng=query_rng(0, "7:1"))
    assert [x.did for x in short[:1]] == ["1:1"] and sorted(x.did for x in short[1:]) == ["1:3", "1:4"]


def test_without_the_random_fallback_a_short_query_keeps_fewer():
    """``mining.random_fallback=False`` (the reranker's lists): only retrieved candidates, however few."""
    from mmret.mining.mine import pick

    common = dict(qid="7:1", target_modality="image", modality_of=lambda d: "image", pool=RANKED)
    common["is_false_negative"] = lambda d: False
    for rule in ("umarvel", "mmembed"):
        mcfg = MiningConfig(rule=rule, negatives=5, top_k=6, modality_top=6, rank_cut=0)
        with_fill = pick(mcfg, RANKED[:3], SCORES[:3], positives=["1:2"], **common)
        assert len(with_fill) == 5 and {x.kind for x in with_fill[2:]} == {"random"}
        mcfg = dataclasses.replace(mcfg, random_fallback=False)
        got = pick(mcfg, RANKED[:3], SCORES[:3], positives=["1:2"], **common)
        assert [x.did for x in got] == ["1:1", "1:3"] and "random" not in {x.kind for x in got}


def test_the_random_fallback_depends_on_seed_and_qid_only():
    pool = [f"1:{i}" for i in range(1000)]

    def draw(seed: int, qid: str) -> list[str]:
        return [x.did for x in random_fill(5, pool, query_rng(seed, qid), lambda d: False)]

    first = draw(0, "9:1")
    draw(0, "9:2")  # another query in between changes nothing
    assert draw(0, "9:1") == first and len(set(first)) == 5
    assert draw(0, "9:2") != first and draw(1, "9:1") != first


# An mmembed ranking for a text -> image task: modality of each retrieved did.
MM = {
    "a1": "text",  # kind a (rank 1 <= modality_top 4)
    "p2": "image",  # a positive
    "c3": "image",  # target modality within the cut: neither kind
    "a4": "image,text",  # kind a
    "x5": "text",  # other modality beyond modality_top: neither kind
    "c6": "image",  # rank 6 = rank_cut: not beyond it
    "b7": "image",  # kind b
    "x8": "text",
    "b9": "image",
    "b10": "image",
    "r1": "image",
    "r2": "text",
    "p3": "image",
}
MM_RANKED = list(MM)[:10]
MM_SCORES = [1.0 - 0.05 * i for i in range(10)]


def mm(n: int, share: float, **kw) -> list[tuple[str, int, str]]:
    got = mmembed(
        MM_RANKED,
        MM_SCORES,
        positives={"p2", "p3"},
        target_modality="image",
        modality_of=MM,
        n=n,
        modality_top=4,
        rank_cut=6,
        modality_share=share,
        pool=list(MM),
        rng=query_rng(0, "q"),
        **kw,
    )
    return [(x.did, x.rank, x.kind) for x in got]


def test_mmembed_kinds_and_share():
    a, b = "modality", "beyond_cut"
    assert mm(4, 0.5) == [("a1", 1, a), ("a4", 4, a), ("b7", 7, b), ("b9", 9, b)]
    assert mm(4, 0.25) == [("a1", 1, a), ("b7", 7, b), ("b9", 9, b), ("b10", 10, b)]
    assert mm(3, 1.0) == [("a1", 1, a), ("a4", 4, a), ("b7", 7, b)]  # kind a short: b fills
    assert mm(5, 0.25) == [("a1", 1, a), ("a4", 4, a), ("b7", 7, b), ("b9", 9, b), ("b10", 10, b)]  # b short: a
    # false negatives are passed over; the shortfall is random: r1 or r2 (not retrieved, not positive)
    got = mm(4, 0.5, is_false_negative={"a1", "b9"}.__contains__)
    assert got[:3] == [("a4", 4, a), ("b7", 7, b), ("b10", 10, b)] and got[3] in [
        ("r1", 0, "random"),
        ("r2", 0, "random"),
    ]
    # five picks, then the fallback: pool candidates neither retrieved nor positive (p3): r1, r2
    got = mm(7, 0.5)
    assert got[:5] == [("a1", 1, a), ("a4", 4, a), ("b7", 7, b), ("b9", 9, b), ("b10", 10, b)]
    assert sorted(got[5:]) == [("r1", 0, "random"), ("r2", 0, "random")]
    assert target_share(5, 0.5) == 3 and target_share(4, 0.5) == 2 and target_share(3, 0.0) == 0  # half up


# ====================================================================================== false negatives


@pytest.fixture()
def content(tmp_path: Path) -> tuple[Path, dict[str, Candidate], list[str]]:
    """A root with a red picture, a copy of its pixels in another format and path, and a blue one."""
    red = np.zeros((12, 16, 3), np.uint8)
    red[..., 0] = 200
    red[3, 5] = (1, 2, 3)
    blue = red[..., ::-1].copy()
    (tmp_path / "img").mkdir()
    (tmp_path / "copies").mkdir()
    Image.fromarray(red).save(tmp_path / "img" / "red.png")
    Image.fromarray(red).save(tmp_path / "copies" / "red.bmp")  # other bytes, same pixels
    Image.fromarray(blue).save(tmp_path / "img" / "blue.png")
    assert (tmp_path / "img" / "red.png").read_bytes() != (tmp_path / "copies" / "red.bmp").read_bytes()
    records = [
        Candidate("1:1", "A red circle", None, "text"),  # positive
        Candidate("2:7", '  "a RED \n  circle.  ', None, "text"),  # same normalised text, another did
        Candidate("1:3", "A blue circle.", None, "text"),
        Candidate("1:10", None, "img/red.png", "image"),  # positive
        Candidate("2:11", None, "copies/red.bmp", "image"),  # same pixels, another path
        Candidate("1:12", None, "img/blue.png", "image"),
        Candidate("1:13", "A red circle.", "img/red.png", "image,text"),  # the positives' content, other modality
        Candidate("1:14", None, "img/missing.png", "image"),
    ]
    return tmp_path, {c.did: c for c in records}, ["1:1", "1:10"]


def test_false_negatives_by_text_and_by_pixels(content):
    root, candidates, positives = content
    loads: list[str] = []

    def loader(path: str) -> Image.Image:
        loads.append(path)
        return load_image(root, path, max_pixels=10**6)

    keys = ContentKeys(candidates, loader, BadRecords("skip"))
    check = keys.checker(positives)
    assert normalise_text(candidates["2:7"]) == normalise_text(candidates["1:1"]) == "a red circle."
    assert [d for d in candidates if d not in positives and check(d)] == ["2:7", "2:11"]
    assert (keys.by_text, keys.by_image) == (1, 1)
    assert keys.checker(positives)("2:11") and (keys.by_text, keys.by_image) == (1, 2)  # another query counts again
    assert sorted(loads) == ["copies/red.bmp", "img/blue.png", "img/missing.png", "img/red.png"]  # each path once
    assert keys.bad.total == 1  # the missing image: skipped, it matches nothing
    with pytest.raises(BadRecordError, match="1:14"):
        ContentKeys(candidates, loader).checker(positives)("1:14")  # on_bad_record="error"


def test_mmembed_settings_are_checked_against_top_k():
    MiningConfig(rule="umarvel", top_k=10)  # rank_cut 45 and modality_top 50 are not read by umarvel
    with pytest.raises(ValueError, match="mining.rank_cut must be in"):
        MiningConfig(rule="mmembed", top_k=40, modality_top=40)
    with pytest.raises(ValueError, match="mining.modality_top"):
        MiningConfig(rule="mmembed", top_k=48)
    with pytest.raises(ValueError, match="mining.rank_cut must be >= 0"):
        MiningConfig(rule="umarvel", rank_cut=-1)


# ==================================================================================== the negatives file


def test_negatives_file_keeps_pairs_and_writes_extra_fields(tmp_path):
    path = tmp_path / "sub" / "negs.jsonl"
    write_negatives(path, [("9:1", ["9:5", "9:6"]), ("9:2", ("9:7",), {"ranks": [3], "kinds": ["hard"]})])
    assert read_jsonl(path) == [
        {"qid": "9:1", "neg_cand_list": ["9:5", "9:6"]},
        {"qid": "9:2", "neg_cand_list": ["9:7"], "ranks": [3], "kinds": ["hard"]},
    ]
    assert read_negatives(path) == {"9:1": ("9:5", "9:6"), "9:2": ("9:7",)}
    with pytest.raises(ValueError, match="qid"):
        write_negatives(path, [("9:3", ["9:8"], {"qid": "9:4"})])
    assert read_negatives(path) == {"9:1": ("9:5", "9:6"), "9:2": ("9:7",)}  # atomic: the old file stands
    assert [p.name for p in path.parent.iterdir()] == ["negs.jsonl"]


# ============================================================================= mine() on the tiny corpus

TASKS = ("cirr_task7", "webqa_task1", "visualnews_task0")
TARGET = {"cirr_task7": "image", "webqa_task1": "text", "visualnews_task0": "image"}
# top_k < negatives: every query needs the random fallback
UMARVEL = MiningConfig(rule="umarvel", negatives=3, top_k=2, tasks=TASKS, seed=3)  # mmembed fields not checked
MMEMBED = MiningConfig(
    rule="mmembed", negatives=4, top_k=12, tasks=TASKS, seed=3, modality_top=8, rank_cut=3, modality_share=0.5
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def shards(directory: Path) -> tuple[list[str], np.ndarray]:
    ids, vectors = [], []
    for path in sorted(directory.glob("shard-*.npz")):
        with np.load(path) as z:
            ids += z["ids"].tolist()
            vectors.append(z["embeddings"])
    return ids, np.concatenate(vectors).astype(np.float32)


def expected_negatives(out: Path, root: Path, m: MiningConfig) -> dict[str, dict]:
    """The negatives file recomputed from out/embeddings: numpy exact inner-product top-k and the rules,
    both restated here."""
    emb = out / "embeddings"
    vectors: dict[str, np.ndarray] = {}
    for group in sorted((emb / "pools").rglob("group.json")):
        if json.loads(group.read_text())["count"] == 0:
            continue  # pools/global/extra: every union candidate is in a local pool
        for did, v in zip(*shards(group.parent), strict=True):
            vectors.setdefault(did, v)
    members = json.loads((emb / "pools" / "global" / "members.json").read_text())
    pool = np.stack([vectors[d] for d in members])
    cands = {c["did"]: c for c in read_jsonl(root / "cand_pool" / "global" / "mbeir_union_train_cand_pool.jsonl")}

    def text_key(c: dict) -> str:
        return " ".join(uniir_format_string(c["txt"]).casefold().split()) if c.get("txt") else ""

    @functools.cache
    def pixels(path: str) -> str:
        a = np.asarray(Image.open(root / path).convert("RGB"))
        return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()

    def image_key(c: dict) -> str | None:
        return pixels(c["img_path"]) if c.get("img_path") else None

    def copy_of(did: str, positives: set[str]) -> bool:
        c = cands[did]
        for p in (cands[p] for p in positives if p in cands):
            if p["modality"] == c["modality"] and (
                (text_key(c) and text_key(c) == text_key(p)) or (c.get("img_path") and image_key(c) == image_key(p))
            ):
                return True
        return False

    def fallback(qid: str, k: int, skip: set[str], positives: set[str]) -> list[tuple]:
        rng, got = query_rng(m.seed, qid), []
        draws = [int(rng.integers(len(members))) for _ in range(16 * (k + 1))]
        for i in draws + [int(i) for i in rng.permutation(len(members))]:
            d = members[i]
            if len(got) < k and d not in skip and d not in got and not copy_of(d, positives):
                got.append(d)
        return [(d, 0, None, "random") for d in got]

    expected = {}
    for task in m.tasks:
        qids, queries = shards(emb / "queries" / task)
        scores = queries @ pool.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, : m.top_k]
        positives = {
            q["qid"]: set(q["pos_cand_list"])
            for q in read_jsonl(root / "query" / "train" / f"mbeir_{task}_train.jsonl")
        }
        for qid, row, s in zip(qids, top, scores, strict=True):
            pos = positives[qid]
            ranked = [members[j] for j in row]
            ok = [
                (d, r, float(s[j]))
                for r, (d, j) in enumerate(zip(ranked, row, strict=True), 1)
                if d not in pos and not copy_of(d, pos)
            ]
            if m.rule == "umarvel":
                picks = [(d, r, sc, "hard") for d, r, sc in ok[: m.negatives]]
            else:
                on = [x for x in ok if cands[x[0]]["modality"] == TARGET[task] and x[1] > m.rank_cut]
                off = [x for x in ok if cands[x[0]]["modality"] != TARGET[task] and x[1] <= m.modality_top]
                n_on = min(len(on), m.negatives - min(len(off), int(m.negatives * m.modality_share + 0.5)))
                n_off = min(len(off), m.negatives - n_on)
                picks = sorted(
                    [(*x, "modality") for x in off[:n_off]] + [(*x, "beyond_cut") for x in on[:n_on]],
                    key=lambda x: x[1],
                )
            picks += fallback(qid, m.negatives - len(picks), pos | set(ranked), pos) if len(picks) < m.negatives else []
            expected[qid] = {
                "neg_cand_list": [p[0] for p in picks],
                "ranks": [p[1] for p in picks],
                "scores": [p[2] for p in picks],
                "kinds": [p[3] for p in picks],
            }
    return expected


def assert_mined(path: Path, expected: dict[str, dict]) -> None:
    got = {r.pop("qid"): r for r in read_jsonl(path)}
    assert list(got) == list(expected)  # one line per qid, tasks in order, each task in file order
    for qid, want in expected.items():
        have = got[qid]
        assert {k: have[k] for k in ("neg_cand_list", "ranks", "kinds")} == {
            k: want[k] for k in ("neg_cand_list", "ranks", "kinds")
        }, qid
        assert [s is None for s in have["scores"]] == [s is None for s in want["scores"]]
        np.testing.assert_allclose(
            [s for s in have["scores"] if s is not None], [s for s in want["scores"] if s is not None], atol=1e-5
        )


def test_mine_matches_an_independent_recomputation_and_reuses(tiny_mbeir, processor_dir, tmp_path, capsys):
    from mmret.mining.mine import mine

    root = with_pools_of(tiny_mbeir, tmp_path / "mbeir", TASKS, "train")  # a union pool of the 3 tasks' pools
    base = eval_trainer_config(root, processor_dir, TASKS)
    cfg = dataclasses.replace(base, mining=UMARVEL)
    run, out = tmp_path / "run", tmp_path / "mined"
    path = Path(mine(cfg, out, workdir=run, step=0))  # step 0: the model before training
    assert path == out / "negatives.jsonl"
    expected = expected_negatives(out, root, UMARVEL)
    assert_mined(path, expected)
    summary = json.loads((out / "summary.json").read_text())
    kinds = [k for e in expected.values() for k in e["kinds"]]
    assert summary["queries"] == len(expected) == 3 * 24 and summary["rule"] == "umarvel"
    assert summary["settings"]["negatives"] == 3 and summary["negatives"] == 3 * 72
    assert summary["kinds"] == {k: kinds.count(k) for k in ("hard", "random") if k in kinds}
    assert summary["fallback_queries"] == sum("random" in e["kinds"] for e in expected.values()) > 0
    assert sum(summary["modalities"].values()) == len(kinds)
    assert set(summary["per_task"]) == set(TASKS)
    pool = read_global_pool(root, "train")
    assert read_negatives(path, pool=pool) == {
        q: tuple(e["neg_cand_list"]) for q, e in expected.items()
    }  # training reads it

    mtime = path.stat().st_mtime_ns
    capsys.readouterr()
    mine(cfg, out, workdir=run, step=0)
    assert "reused" in capsys.readouterr().out and path.stat().st_mtime_ns == mtime

    cfg = dataclasses.replace(base, mining=MMEMBED)  # other settings: mined again, the embeddings reused
    mine(cfg, out, workdir=run, step=0)
    printed = capsys.readouterr().out
    assert "complete, reused" in printed and "mined negatives" in printed and path.stat().st_mtime_ns != mtime
    expected = expected_negatives(out, root, MMEMBED)
    assert_mined(path, expected)
    assert {"modality", "beyond_cut"} <= {k for e in expected.values() for k in e["kinds"]}

    run.mkdir()  # the CLI on the run's config.json: the same inputs, so the file is reused and the summary printed
    (run / "config.json").write_text(json.dumps(config_to_json(cfg)))
    tool = load_tool("mine")
    args = ["--workdir", str(run), "--step", "0", "--out", str(out)]
    assert tool.main(args) == 0
    printed = capsys.readouterr().out
    assert "reused" in printed and json.loads(printed[printed.index("{") :])["rule"] == "mmembed"
    assert tool.main([*args, "--negatives", "0"]) == 1  # a bad setting: one line, no traceback
    assert "mining.negatives must be positive" in capsys.readouterr().err

    # ScaNN instead of exact search: mined again from the same embeddings; every rank is a retrieved one
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, search=SearchConfig(method="scann")))
    mine(cfg, out, workdir=run, step=0)
    assert "complete, reused" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["search"]["global"]["method"] == "scann" and summary["negatives"] == 4 * 72
    mined = read_jsonl(path)
    ranks = [(r, k) for line in mined for r, k in zip(line["ranks"], line["kinds"], strict=True)]
    assert all(r <= MMEMBED.top_k and (r > 0) == (k != "random") for r, k in ranks)
    assert read_negatives(path, pool=pool).keys() == expected.keys()


def test_mine_filters_copies_of_positives(tiny_mbeir, processor_dir, tmp_path):
    """A copy of a candidate's image (another path and format) and of a text candidate (other case and
    spacing) become positives of two queries under new dids: the originals are then false negatives, never
    mined, whatever their rank (every candidate is ranked: top_k and negatives cover the pool)."""
    from mmret.mining.mine import mine

    tasks = ("cirr_task7", "webqa_task1")
    root = with_pools_of(tiny_mbeir, tmp_path / "mbeir", tasks, "train")
    union = root / "cand_pool" / "global" / "mbeir_union_train_cand_pool.jsonl"
    copied = {}
    for task, kind, new_did in (("cirr_task7", "image", "8:999999"), ("webqa_task1", "text", "2:999999")):
        pool_file = root / "cand_pool" / "local" / f"mbeir_{task}_cand_pool.jsonl"
        original = next(c for c in read_jsonl(pool_file) if c["modality"] == kind)
        copy = {**original, "did": new_did}
        if kind == "image":
            copy["img_path"] = original["img_path"].replace(".png", "_copy.bmp")
            Image.open(root / original["img_path"]).convert("RGB").save(root / copy["img_path"])
        else:
            copy["txt"] = "  " + original["txt"].upper().replace(" ", "   ") + " "
        for path in (pool_file, union):
            path.write_text(path.read_text() + json.dumps(copy) + "\n")
        query_file = root / "query" / "train" / f"mbeir_{task}_train.jsonl"
        queries = read_jsonl(query_file)
        queries[0]["pos_cand_list"].append(new_did)
        query_file.write_text("".join(json.dumps(q) + "\n" for q in queries))
        copied[queries[0]["qid"]] = original["did"]
    m = MiningConfig(rule="umarvel", negatives=5000, top_k=5000, tasks=tasks)
    cfg = dataclasses.replace(eval_trainer_config(root, processor_dir, tasks), mining=m)
    out = tmp_path / "mined"
    path = Path(mine(cfg, out, workdir=tmp_path / "run", step=0))
    expected = expected_negatives(out, root, m)
    assert_mined(path, expected)
    for qid, did in copied.items():
        assert did not in expected[qid]["neg_cand_list"]
    mined = {r["qid"]: r["neg_cand_list"] for r in read_jsonl(path)}
    assert sum(did in mined[q] for q in mined for did in copied.values()) > 0  # other queries keep them
    summary = json.loads((out / "summary.json").read_text())
    assert summary["false_negatives"]["text"] >= 1 and summary["false_negatives"]["image"] >= 1
