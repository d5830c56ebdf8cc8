"""Embedding export and evaluation wiring: data-parallel embeddings equal single-example forwards,
shards resume, the global pool reuses local embeddings, and recall follows planted rankings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import eval_trainer_config, with_pools_of

from mmret.data.bad_records import BadRecords
from mmret.data.mbeir import (
    candidate_text,
    query_text_parts,
    read_global_pool,
    read_local_pool,
    read_qrels,
    read_queries,
)
from mmret.data.processor import Processor
from mmret.data.stores import EvalStore
from mmret.eval import embed as embed_mod
from mmret.eval.embed import Embeddings, embed, load_encoder, shard_name, write_json
from mmret.eval.evaluate import evaluate
from mmret.eval.metrics import read_trec
from mmret.recipe import EvalConfig, SearchConfig

TASKS = ("cirr_task7", "webqa_task1")  # (image, text) -> image and text -> text


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    from mmret.data.synthetic import write_synthetic_mbeir
    from mmret.models.qwen2_vl.processor_files import write_processor_files

    base = tmp_path_factory.mktemp("eval")
    write_processor_files(base / "proc")
    write_synthetic_mbeir(base / "mbeir", scale="tiny", seed=0)
    return {"base": base, "root": base / "mbeir", "proc": base / "proc"}


def trainer_cfg(env: dict, tasks: tuple[str, ...] | list[str] = TASKS, **eval_overrides):
    return eval_trainer_config(env["root"], env["proc"], tasks, **eval_overrides)


@pytest.fixture(scope="module")
def embedded(env) -> Path:
    out = env["base"] / "emb"
    embed(trainer_cfg(env), out)
    return out


def test_sharded_embeddings_equal_single_example_forwards(env, embedded):
    """8 devices, batches of 8 with padding slots, shards of 40 vs one example at a time on the host."""
    assert len(jax.devices()) == 8
    cfg = trainer_cfg(env)
    emb = Embeddings(embedded)
    encoder = load_encoder(cfg)
    proc = Processor(env["proc"], cfg.data.processor)
    store = EvalStore(env["root"], "test", list(TASKS), ["local"], BadRecords("error"))

    def one(example) -> np.ndarray:
        batch = proc.collate([example], max_length=96, max_patches=64)
        return np.asarray(encoder({k: v for k, v in batch.items() if k != "valid"}))[0]

    qids, qv = emb.queries("cirr_task7")
    assert qids == [q.qid for q in read_queries(env["root"], "test", "cirr_task7")]
    for row in (0, len(qids) - 1):
        q = store.task_queries["cirr_task7"][row]
        instruction, text = query_text_parts(q, store.instructions, seed=0)
        image = store.image(q.image_path, max_pixels=10**8)
        ref = one(proc(text=text, image=image, instruction=instruction))
        np.testing.assert_allclose(qv[row].astype(np.float32), ref, atol=2e-3)
    dids, cv = emb.local_pool("webqa_task1")
    assert dids == list(read_local_pool(env["root"], "webqa_task1"))
    assert cv.dtype == np.float16 and cv.shape == (len(dids), 64) and len(dids) > 40  # several shards
    for row in (0, 41, len(dids) - 1):
        cand = store.candidate(dids[row])  # the pool holds wrong-modality distractors too
        image = None if cand.image_path is None else store.image(cand.image_path, max_pixels=10**8)
        ref = one(proc(text=candidate_text(cand) or None, image=image))
        np.testing.assert_allclose(cv[row].astype(np.float32), ref, atol=2e-3)


def test_packed_embedding_equals_the_padded_one(env, embedded, tmp_path, monkeypatch):
    """eval.packing: batches of 16 in 8 rows of 192 tokens (sharded over the 8 devices) give the padded batches'
    embeddings, every query and candidate."""
    from mmret.data import packing

    rows = []
    real_pack = packing.pack

    def counting(examples, cfg, **kw):
        side = real_pack(examples, cfg, **kw)
        rows.append((len(examples), packing.num_rows(side)))
        return side

    monkeypatch.setattr(packing, "pack", counting)
    out = tmp_path / "packed"
    embed(trainer_cfg(env, batch_size=16, packing={"rows": (8,), "row_length": 192}), out)
    assert rows and all(n == 16 for n, _ in rows) and sum(r == 8 for _, r in rows) >= len(rows) // 2
    padded, packed = Embeddings(embedded), Embeddings(out)
    for task in TASKS:
        (a_ids, a), (b_ids, b) = padded.queries(task), packed.queries(task)
        assert a_ids == b_ids
        np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), atol=2e-3)
        (a_ids, a), (b_ids, b) = padded.local_pool(task), packed.local_pool(task)
        assert a_ids == b_ids
        np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), atol=2e-3)


def test_rerun_redoes_only_missing_shards(env, embedded, tmp_path):
    out = tmp_path / "emb"
    for p in embedded.rglob("*"):  # a copy of a finished run
        if p.is_file():
            (out / p.relative_to(embedded)).parent.mkdir(parents=True, exist_ok=True)
            (out / p.relative_to(embedded)).write_bytes(p.read_bytes())
    pool_dir = out / "pools" / "local" / "webqa_task1"
    kept, lost = pool_dir / shard_name(0), pool_dir / shard_name(1)
    os.utime(kept, (1, 1))
    lost.unlink()
    with pytest.raises(FileNotFoundError, match="1 of .* shards missing"):
        Embeddings(out).local_pool("webqa_task1")
    calls = []
    original = embed_mod.Embedder.__call__
    embed_mod.Embedder.__call__ = lambda self, b: calls.append(1) or original(self, b)
    try:
        embed(trainer_cfg(env), out)
    finally:
        embed_mod.Embedder.__call__ = original
    assert kept.stat().st_mtime == 1  # untouched
    assert len(calls) == 5  # the lost shard's 40 items in batches of 8, nothing else
    a, b = Embeddings(embedded).local_pool("webqa_task1"), Embeddings(out).local_pool("webqa_task1")
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_interrupted_run_completes_to_the_same_embeddings(env, embedded, tmp_path):
    out = tmp_path / "emb"
    original = embed_mod.Embedder.__call__
    calls = []

    def dying(self, batch):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt("killed")
        return original(self, batch)

    embed_mod.Embedder.__call__ = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            embed(trainer_cfg(env), out)
    finally:
        embed_mod.Embedder.__call__ = original
    assert not list(out.rglob(".*tmp*"))  # no half-written shard
    embed(trainer_cfg(env), out)
    for task in TASKS:
        for group in (f"queries/{task}", f"pools/local/{task}"):
            a, b = Embeddings(embedded).group(group), Embeddings(out).group(group)
            assert a[0] == b[0]
            np.testing.assert_array_equal(a[1], b[1])


def test_other_settings_replace_the_directory_whole(env, embedded, tmp_path, capsys):
    """A directory made with other settings is recomputed, never topped up: a stale shard disappears."""
    out = tmp_path / "emb"
    stale = out / "pools" / "local" / "webqa_task1" / shard_name(0)
    stale.parent.mkdir(parents=True)
    stale.write_bytes((embedded / "pools" / "local" / "webqa_task1" / shard_name(0)).read_bytes())
    os.utime(stale, (1, 1))
    (out / "embeddings.json").write_bytes((embedded / "embeddings.json").read_bytes())
    cfg = trainer_cfg(env, instruction_seed=1, tasks=["webqa_task1"])
    embed(cfg, out)
    line = next(x for x in capsys.readouterr().out.splitlines() if "are stale" in x)
    assert "instruction_seed, tasks changed): recomputing them" in line
    assert "data_files (cand_pool/local/mbeir_cirr_task7_cand_pool.jsonl, " in line  # no longer read
    assert stale.stat().st_mtime > 1  # written anew, not reused
    manifest = json.loads((out / "embeddings.json").read_text())
    assert manifest["instruction_seed"] == 1 and manifest["tasks"] == ["webqa_task1"]
    assert not (out / "queries" / "cirr_task7").exists()
    assert not list(tmp_path.glob(".emb.stale*"))
    (out / "notes.txt").write_text("mine")  # a directory with foreign files is not deleted
    with pytest.raises(ValueError, match="also holds notes.txt: not deleting"):
        embed(trainer_cfg(env, instruction_seed=2, tasks=["webqa_task1"]), out)


def test_global_pool_reuses_local_embeddings(env, tmp_path):
    """The union pool plus one candidate found in no local pool: only that one is embedded anew. The root keeps
    three tasks' local pools: the two evaluated and MSCOCO's (its test pool file, read only for the union)."""
    kept = (*TASKS, "mscoco_task0")
    root = with_pools_of(env["root"], tmp_path / "mbeir", kept, "test")
    union = root / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl"
    extra = {"did": "2:999999", "txt": "An extra passage.", "img_path": None, "modality": "text", "src_content": None}
    union.write_text(union.read_text() + json.dumps(extra) + "\n")
    cfg = trainer_cfg(env, root=str(root), pools=["global"], shard_size=4096)
    calls = []
    original = embed_mod.Embedder.__call__
    embed_mod.Embedder.__call__ = lambda self, b: calls.append(1) or original(self, b)
    try:
        embed(cfg, tmp_path / "emb")
    finally:
        embed_mod.Embedder.__call__ = original
    emb = Embeddings(tmp_path / "emb")
    members, vectors = emb.global_pool()
    assert members == list(read_global_pool(root))
    local_total = sum(len(read_local_pool(root, t)) for t in kept)
    assert len(members) == local_total + 1
    assert emb.group("pools/global/extra")[0] == ["2:999999"]
    dids, local = emb.local_pool("webqa_task1")
    np.testing.assert_array_equal(vectors[members.index(dids[3])], local[3])
    # Batches: queries of the 2 tasks + 3 local pools + 1 extra, each group in batches of 8 (no group twice).
    expected = sum(-(-len(read_queries(root, "test", t)) // 8) for t in TASKS)
    expected += sum(-(-len(read_local_pool(root, t)) // 8) for t in kept) + 1
    assert len(calls) == expected


def planted(env: dict, tmp_path: Path, noise: float = 0.0) -> Path:
    """An embeddings directory whose vectors plant a known ranking: cirr queries point at their first
    positive (R@1 = 100), webqa queries at a candidate that is not a positive (R@10 = 0); ``noise``
    (a Gaussian's scale relative to the unit vectors) moves each query away from its target."""
    rng = np.random.default_rng(0)
    out = tmp_path / f"planted{noise}"
    write_json(out / "embeddings.json", {"split": "test", "dim": 32, "tasks": list(TASKS), "source": {"preset": "x"}})
    qrels = {
        **read_qrels(env["root"], "test", "cirr_task7").positives,
        **read_qrels(env["root"], "test", "webqa_task1").positives,
    }
    for task in TASKS:
        dids = list(read_local_pool(env["root"], task))
        vectors = rng.normal(size=(len(dids), 32))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        qids = [q.qid for q in read_queries(env["root"], "test", task)]
        if task == "cirr_task7":
            target = [dids.index(qrels[q][0]) for q in qids]
        else:
            target = [next(i for i, d in enumerate(dids) if d not in qrels[q]) for q in qids]
        queries = vectors[target] + noise / np.sqrt(32) * rng.normal(size=(len(qids), 32))
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        for name, ids, vec in ((f"queries/{task}", qids, queries), (f"pools/local/{task}", dids, vectors)):
            write_json(out / name / "group.json", {"count": len(ids), "shards": 1})
            np.savez(out / name / shard_name(0), embeddings=vec.astype(np.float16), ids=np.asarray(ids))
    return out


def test_recall_follows_a_planted_ranking(env, tmp_path):
    report = evaluate(planted(env, tmp_path), env["root"], "local", tmp_path / "out", top=5)
    cirr, webqa = report["tasks"]["cirr_task7"], report["tasks"]["webqa_task1"]
    assert cirr["recall@1"] == 100.0 and cirr["num_queries"] == 24
    assert webqa["recall@1"] == 0.0  # its top hit is a non-positive; other positives may follow
    run = read_trec(tmp_path / "out" / "cirr_task7.trec")
    qrels = read_qrels(env["root"], "test", "cirr_task7").positives
    assert len(run) == 24 and all(len(r) == 5 and r[0][0] == qrels[q][0] for q, r in run.items())
    assert report["average"] == pytest.approx((100.0 + webqa["recall@5"]) / 2)
    assert report["search"] == {"cirr_task7": {"method": "exact"}, "webqa_task1": {"method": "exact"}}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "- search: exact (see Search below)" in md and "exact search (inner product, all candidates): every" in md
    assert "ScaNN" not in md and report["fingerprint"]["search"]["method"] == "auto"


def test_scann_path_and_check_exact(env, tmp_path, capsys):
    search = SearchConfig(method="scann", num_leaves=4, num_leaves_to_search=4, training_sample_size=200)
    report = evaluate(
        planted(env, tmp_path), env["root"], "local", tmp_path / "out", search=search, check_exact_queries=10
    )
    assert report["tasks"]["cirr_task7"]["recall@1"] == 100.0  # all leaves searched, reordered exactly
    cirr = report["search"]["cirr_task7"]
    assert cirr["method"] == "scann" and cirr["params"]["num_leaves"] == 4 and cirr["check_exact"] == 10
    assert cirr["agreement"]["cirr_task7"]["queries"] == 10 and cirr["agreement"]["cirr_task7"]["difference"] == 0
    assert "check_exact cirr_task7 cirr_task7: R@5 ScaNN 100.0 - exact 100.0 = +0.0 on 10" in capsys.readouterr().out
    # ScaNN without a sample: the report says that its agreement with exact search was not measured.
    report = evaluate(planted(env, tmp_path), env["root"], "local", tmp_path / "out0", search=search)
    assert report["search"]["webqa_task1"]["agreement"] is None
    assert report["search"]["webqa_task1"]["agreement_note"] == "not measured (eval.check_exact = 0)"
    md = (tmp_path / "out0" / "report.md").read_text()
    assert "- search: ScaNN (see Search below)" in md
    assert "- webqa_task1: ScaNN (num_leaves=4, num_leaves_to_search=4," in md
    assert "agreement with exact search: not measured (eval.check_exact = 0)" in md


def test_scann_agreement_is_the_recall_difference_of_the_two_rankings(env, tmp_path):
    """A ScaNN index that searches 1 of 8 leaves, on queries near their positive: its Recall@5 minus exact
    search's, recomputed here from ScaNN's TREC file and a plain numpy ranking, on every query."""
    emb = planted(env, tmp_path, noise=1.0)
    search = SearchConfig(method="scann", num_leaves=8, num_leaves_to_search=1, training_sample_size=248, reorder=5)
    report = evaluate(emb, env["root"], "local", tmp_path / "out", search=search, check_exact_queries=1000)
    differences = []
    for task in TASKS:
        qids, q = Embeddings(emb).queries(task)
        dids, v = Embeddings(emb).local_pool(task)
        positives = read_qrels(env["root"], "test", task).positives
        scann_run = read_trec(tmp_path / "out" / f"{task}.trec")
        exact_top = np.argsort(-(q.astype(np.float32) @ v.astype(np.float32).T), axis=1, kind="stable")[:, :5]
        scann_hits = [any(d in positives[qid] for d, _ in scann_run[qid][:5]) for qid in qids]
        exact_hits = [any(dids[j] in positives[qid] for j in row) for qid, row in zip(qids, exact_top, strict=True)]
        a = report["search"][task]["agreement"][task]
        assert (a["k"], a["queries"]) == (5, 24)
        assert a["recall_scann"] == pytest.approx(100 * np.mean(scann_hits))
        assert a["recall_scann"] == pytest.approx(report["tasks"][task]["recall@5"])  # every query sampled
        assert a["recall_exact"] == pytest.approx(100 * np.mean(exact_hits))
        assert a["difference"] == pytest.approx(100 * (np.mean(scann_hits) - np.mean(exact_hits)))
        differences.append(a["difference"])
    assert min(differences) < 0  # the setting loses positives: the check is not vacuous
    md = (tmp_path / "out" / "report.md").read_text()
    a = report["search"]["cirr_task7"]["agreement"]["cirr_task7"]
    assert f"| cirr_task7 | cirr_task7 | 24 | R@5 | {a['recall_scann']:.1f} | {a['recall_exact']:.1f} |" in md


def test_eval_config_errors_name_the_key():
    with pytest.raises(ValueError, match="eval.pools"):
        EvalConfig(pools=("local", "union"))
    with pytest.raises(ValueError, match="eval.shard_size"):
        EvalConfig(shard_size=0)


def test_scann_eval_tool_writes_the_report(env, tmp_path, capsys):
    from helpers import load_tool

    tool = load_tool("scann_eval")
    emb = planted(env, tmp_path)
    args = ["--embeddings", str(emb), "--mbeir_root", str(env["root"]), "--pool", "local", "--out"]
    assert tool.main([*args, str(tmp_path / "out"), "--method", "exact"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tasks"]["cirr_task7"]["recall@1"] == 100.0 and report["pool"] == "local"
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| cirr_task7 | 24 | 100.0 |" in capsys.readouterr().out
    assert tool.main([*args, str(tmp_path / "out2"), "--tasks", "nights_task4"]) == 1
    assert "nights_task4 was not embedded" in capsys.readouterr().err


# ------------------------------------------------------------------ evaluate_run: reuse keyed, never stale


class CountCalls:
    """Count the embedding batches run while in the ``with`` block."""

    def __enter__(self) -> list[int]:
        self.calls: list[int] = []
        self.original = embed_mod.Embedder.__call__
        embed_mod.Embedder.__call__ = lambda s, b: self.calls.append(1) or self.original(s, b)
        return self.calls

    def __exit__(self, *exc: object) -> None:
        embed_mod.Embedder.__call__ = self.original


def shard_mtimes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("shard-*.npz"))}


def test_eval_run_reuses_only_what_nothing_changed(env, tmp_path, capsys):
    """Same inputs: reused (no batch embedded, shards untouched). A touched qrels file: the report redone
    on the same embeddings. Another corpus under data.root: embeddings and report recomputed. A root
    that is not there: an error, not the old numbers."""
    from mmret.data.synthetic import write_synthetic_mbeir
    from mmret.eval.run import evaluate_run

    task = "webqa_task1"
    other = tmp_path / "mbeir_seed1"
    write_synthetic_mbeir(other, scale="tiny", seed=1)
    workdir, emb = tmp_path / "run", tmp_path / "run" / "eval" / "0" / "embeddings"
    cfg_a, cfg_b = trainer_cfg(env, [task]), trainer_cfg(env, [task], root=str(other))
    first = evaluate_run(cfg_a, workdir, 0)["local"]
    assert first["fingerprint"]["embeddings"]["mbeir_root"] == str(env["root"].absolute())
    assert first["fingerprint"]["qrels_files"].keys() == {f"qrels/test/mbeir_{task}_test_qrels.txt"}
    before = shard_mtimes(emb)
    capsys.readouterr()

    with CountCalls() as calls:
        again = evaluate_run(cfg_a, workdir, 0)["local"]
    assert calls == [] and shard_mtimes(emb) == before and again == first
    assert "(reused: nothing it depends on changed)" in capsys.readouterr().out

    qrels = env["root"] / "qrels" / "test" / f"mbeir_{task}_test_qrels.txt"
    stat = qrels.stat()
    try:
        os.utime(qrels, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        with CountCalls() as calls:
            redone = evaluate_run(cfg_a, workdir, 0)["local"]
        assert calls == [] and shard_mtimes(emb) == before  # the embeddings do not read the qrels
        assert redone["fingerprint"] != first["fingerprint"] and redone["tasks"] == first["tasks"]
    finally:
        os.utime(qrels, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the shared corpus as it was

    with CountCalls() as calls:
        changed = evaluate_run(cfg_b, workdir, 0)["local"]
    assert len(calls) > 0 and "are stale (data_files (" in capsys.readouterr().out
    assert changed["mbeir_root"] == str(other) and changed["fingerprint"] != first["fingerprint"]
    after = shard_mtimes(emb)
    assert after.keys() == before.keys() and all(after[k] > before[k] for k in before)  # every shard rewritten
    assert Embeddings(emb).local_pool(task)[0] == list(read_local_pool(other, task))
    assert changed["tasks"][task] != first["tasks"][task]  # other queries, other numbers

    with pytest.raises(FileNotFoundError, match="the M-BEIR root .* is not a directory"):
        evaluate_run(trainer_cfg(env, [task], root=str(tmp_path / "nothing")), workdir, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"mbeir_{task}_test.jsonl: no test queries"):
        evaluate_run(trainer_cfg(env, [task], root=str(tmp_path / "empty")), workdir, 0)


# --------------------------------------------------------- evaluation validates its queries like training


@pytest.fixture(scope="module")
def broken(env) -> dict:
    """A corpus whose webqa_task1 local pool lacks one positive (the first query's first positive)."""
    from mmret.data.synthetic import write_synthetic_mbeir

    root = env["base"] / "broken"
    write_synthetic_mbeir(root, scale="tiny", seed=0)
    task = "webqa_task1"
    queries = read_queries(root, "test", task)
    removed = queries[0].pos_cand_list[0]
    path = root / "cand_pool" / "local" / f"mbeir_{task}_cand_pool.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if json.loads(line)["did"] != removed))
    hit = [i + 1 for i, q in enumerate(queries) if removed in q.pos_cand_list]  # 1-based lines of the file
    return {"root": root, "task": task, "removed": removed, "lines": hit, "queries": len(queries)}


def test_a_positive_missing_from_the_local_pool_stops_the_evaluation(env, broken, tmp_path):
    from mmret.data.bad_records import BadRecordError
    from mmret.eval.run import evaluate_run

    cfg = trainer_cfg(env, [broken["task"]], root=str(broken["root"]))
    where = f"mbeir_{broken['task']}_test.jsonl:{broken['lines'][0]}: positive_not_in_pool"
    with pytest.raises(BadRecordError, match=f"{where}: query .*positive '{broken['removed']}' is not in the local"):
        evaluate_run(cfg, tmp_path / "run", 0)
    assert not (tmp_path / "run" / "eval" / "0" / "local" / "report.json").exists()


def test_skipped_queries_are_counted_and_the_report_is_not_complete(env, broken, tmp_path):
    from mmret.eval.run import evaluate_run

    cfg = trainer_cfg(env, [broken["task"]], root=str(broken["root"]), on_bad_record="skip")
    report = evaluate_run(cfg, tmp_path / "run", 0)["local"]
    n = len(broken["lines"])
    assert report["complete"] is False
    assert report["tasks"][broken["task"]]["num_queries"] == broken["queries"] - n
    skipped = report["skipped"]["queries"][broken["task"]]
    assert skipped["count"] == n and skipped["reasons"] == {"positive_not_in_pool": n}
    md = (tmp_path / "run" / "eval" / "0" / "local" / "report.md").read_text()
    assert f"- {broken['task']}: {n} test queries dropped (positive_not_in_pool {n})" in md
    assert f"{n} test queries skipped" in md and "this report is not complete" in md


def test_oven_and_infoseek_cross_dataset_positives_are_not_flagged(env):
    """Their qrels name the other dataset's copy too, which only the global pool holds: no bad record."""
    tasks = ["oven_task6", "infoseek_task6"]
    store = EvalStore(env["root"], "test", tasks, ["local"], BadRecords("error"))
    for task in tasks:
        qrels = read_qrels(env["root"], "test", task).positives
        pool = store.pools[task]
        cross = [q for q in store.task_queries[task] if any(d not in pool for d in qrels[q.qid])]
        assert len(store.task_queries[task]) == 24 and cross  # the case exists and passes
        assert all(d in pool for q in store.task_queries[task] for d in q.pos_cand_list)
