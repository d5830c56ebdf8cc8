"""The shipped recipe configs state the papers' values; epochs become steps from the training file's size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from mmret import chain
from mmret.losses import info_nce
from mmret.recipe import as_trainer_config, step_pipeline, with_epochs

REPO = Path(__file__).resolve().parents[1]


def load_config(recipe: str, arg: str | None = None):
    """``configs/<recipe>.py``'s ``get_config(arg)`` (a ConfigDict)."""
    spec = importlib.util.spec_from_file_location(f"{recipe}_config", REPO / "configs" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def umarvel(arg: str | None = None):
    spec = importlib.util.spec_from_file_location("umarvel_config", REPO / "configs" / "umarvel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.unlock()
    if arg in (None, "mbeir"):
        c.model.hf_dir, c.data.root = "/models/Qwen2-VL-7B-Instruct", "/data/M-BEIR"
    if arg is None:
        c.stages.text.overrides.data.root, c.stages.caption.overrides.data.root = "/data/nli", "/data/cc3m"
    return as_trainer_config(c)


def test_paper_config_has_umarvels_loss_lora_and_exact_search():
    cfg = umarvel()
    assert cfg.lora.dropout == 0.05 and (cfg.lora.rank, cfg.lora.alpha) == (128, 256.0)
    assert cfg.mask_false_negatives is False and cfg.symmetric_reduction == "sum"
    assert cfg.eval.search.method == "exact"
    assert cfg.data.query_file == "auto" and cfg.data.split == "train"
    assert cfg.epochs == 1.0
    # 1.33M lines of mbeir_union_up_train.jsonl over 8 hosts of 480: 346 steps, derived, not a constant.
    assert with_epochs(cfg, 1_330_000, 8 * 480).optimizer.total_steps == 1_330_000 // 3840
    demo = umarvel("mbeir_demo")
    assert demo.epochs is None and with_epochs(demo, 3328, 64).steps == 600  # a fixed length
    assert umarvel("mbeir").stages == () and umarvel("mbeir").lora == cfg.lora  # stage 3 alone


def test_every_shipped_recipe_packs_and_its_paper_shapes_split_over_8_devices_a_host():
    """Sequence packing is on in every trained stage of the paper and demo presets; the paper presets' batch
    shapes (GradCache chunks, packed rows and patch rows, evaluation rows) divide over a host's 8 devices."""
    for recipe in ("umarvel", "mmembed", "jfe"):
        for arg in (None, "demo"):
            c = load_config(recipe, arg)
            c.unlock()
            c.model.hf_dir, c.data.root = "/models/m", "/data/mbeir"
            for source in c.stages.get("adapt", {}).get("overrides", {}).get("data", {}).get("mix", {}).values():
                source.root = "/data/nli"
            for stage in c.stages.values():
                data = stage.get("overrides", {}).get("data", {})
                if "root" in data and data["root"] is None:
                    data["root"] = "/data/pairs"
            cfg = as_trainer_config(c)
            for stage in cfg.stages:
                s = chain.stage_config(cfg, stage.name, "/run")
                where = f"{recipe}:{arg} {stage.name}"
                if s.task == "reranker":
                    continue
                p = step_pipeline(s)
                assert p.query_packing.enabled and p.candidate_packing.enabled, where
                if arg is not None:
                    continue
                assert p.grad_cache_chunk is None or p.grad_cache_chunk % 8 == 0, where
                for packs in (p.query_packing, p.candidate_packing, s.eval.packing):
                    assert all(r % 8 == 0 for r in packs.rows) and all(x % 32 == 0 for x in packs.patches), where


def test_paper_chain_follows_the_stage_table():
    """RECIPES.md s.3's table: data, LoRA, per-device batch (x 8 devices per host), LR, epochs, temperature."""
    cfg = umarvel()
    assert [s.name for s in cfg.stages] == ["text", "caption", "mbeir", "hardneg", "reranker", "distill"]
    stages = {s.name: chain.stage_config(cfg, s.name, "/run") for s in cfg.stages}
    table = {
        "text": ("nli", 64, 128.0, 72, 2e-4, 2.0),
        "caption": ("caption", 128, 256.0, 60, 1e-4, 1.0),
        "mbeir": ("mbeir", 128, 256.0, 60, 4e-4, 1.0),
        "hardneg": ("mbeir", 128, 256.0, 17, 1.5e-5, 1.0),
    }
    for name, (layout, rank, alpha, per_device, lr, epochs) in table.items():
        s = stages[name]
        assert (s.data.layout, s.lora.rank, s.lora.alpha) == (layout, rank, alpha), name
        # per_device sequences a device at once: GradCache chunks are per host, the whole host batch is the plain step
        assert s.data.pipeline.batch_size == 8 * per_device and s.grad_cache_chunk == 8 * per_device, name
        assert step_pipeline(s).grad_cache_chunk is None, name
        assert (s.optimizer.learning_rate, s.epochs, s.optimizer.warmup_ratio) == (lr, epochs, 0.03), name
        assert s.lora.dropout == 0.05 and s.optimizer.weight_decay == 0.0 and s.model.dtype == "bfloat16", name
    assert [stages[n].temperature.learnable for n in table] == [False, False, True, True]
    assert stages["caption"].symmetric and not stages["mbeir"].symmetric and cfg.symmetric_reduction == "sum"
    assert [stages[n].model.init_from for n in table] == [None, "/run/text", "/run/caption", "/run/mbeir"]
    hardneg = stages["hardneg"]
    assert (
        hardneg.data.pipeline.num_negatives == 5 and hardneg.data.negatives_file == "/run/hardneg/mined/negatives.jsonl"
    )
    assert (hardneg.mining.rule, hardneg.mining.negatives, hardneg.mining.top_k, hardneg.mining.pool) == (
        "umarvel",
        5,
        100,
        "global",
    )
    assert cfg.stages[3].mine_from == "mbeir"
    assert all(s.eval.root == "/data/M-BEIR" for s in stages.values())  # evaluated on M-BEIR whatever they train on
    # The reranker (RECIPES.md s.3): from the base model, the stage-3 model's LOCAL top 100 minus the positives,
    # LoRA 128/256, lr 2e-5, 1 epoch, texts cut to 256 tokens, pairs up to 2048 tokens, the Yes/No prompt.
    rr = stages["reranker"]
    assert rr.task == "reranker" and rr.model.init_from is None and cfg.stages[4].mine_from == "mbeir"
    m = rr.mining
    assert (m.rule, m.pool, m.negatives, m.top_k, m.false_negative_filter, m.random_fallback) == (
        "umarvel",
        "local",
        100,
        100,
        False,
        False,
    )
    assert rr.data.negatives_file == "/run/reranker/mined/negatives.jsonl"
    assert (rr.lora.rank, rr.lora.alpha, rr.optimizer.learning_rate, rr.epochs) == (128, 256.0, 2e-5, 1.0)
    assert (rr.rerank.prompt, rr.rerank.max_text_tokens, rr.rerank.max_length, rr.rerank.top_k) == (
        "umarvel",
        256,
        2048,
        50,
    )
    assert not (rr.eval.at_start or rr.eval.at_end)
    # Stage 5 (RECIPES.md s.3): from the merged stage-4 model, whose LOCAL top 50 of 10% of the training queries
    # the reranker rescores; w 1.0 (0.5 mscoco_task0, 0.1 mscoco_task3); the fused scores halved; no InfoNCE;
    # 2 queries per device, lr 1e-5, 1 epoch; LoRA 128/256.
    d = stages["distill"]
    assert (cfg.stages[5].init_from, cfg.stages[5].teacher_from, d.task) == ("hardneg", "reranker", "distill")
    assert d.model.init_from == "/run/hardneg" and d.distill.teacher_file == "/run/distill/teacher/teacher.jsonl"
    dc = d.distill
    assert (dc.fraction, dc.top_k, dc.split, dc.teacher_scale, dc.infonce_weight, dc.log_eps) == (
        0.1,
        50,
        "train",
        0.5,
        0.0,
        1e-8,
    )
    assert [dc.weight_of(t) for t in ("mscoco_task0", "mscoco_task3", "cirr_task7")] == [0.5, 0.1, 1.0]
    assert d.data.pipeline.batch_size == 8 * 2 and d.grad_cache_chunk is None
    assert d.data.pipeline.max_candidate_patches == 8 * 2 * 50 * 1200  # 50 candidates per query
    assert (d.lora.rank, d.lora.alpha, d.optimizer.learning_rate, d.epochs) == (128, 256.0, 1e-5, 1.0)
    assert d.temperature.learnable


def test_with_epochs_derives_the_schedule_and_leaves_explicit_steps_alone():
    cfg = umarvel()
    assert with_epochs(cfg, 1000, 10).optimizer.total_steps == 100
    half = as_trainer_config({"model": {"preset": "tiny"}, "epochs": 0.5, "optimizer": {"total_steps": 7}})
    assert with_epochs(half, 1000, 10).steps == 50  # epochs replace optimizer.total_steps
    plain = as_trainer_config({"model": {"preset": "tiny"}, "optimizer": {"total_steps": 7}})
    assert with_epochs(plain, 1000, 10).steps == 7
    with pytest.raises(ValueError, match="less than one global batch"):
        with_epochs(half, 10, 64)
    with pytest.raises(ValueError, match="epochs must be positive"):
        as_trainer_config({"model": {"preset": "tiny"}, "epochs": 0.0})
    with pytest.raises(ValueError, match="symmetric_reduction"):
        as_trainer_config({"model": {"preset": "tiny"}, "symmetric_reduction": "max"})


def _reference_infonce(q: np.ndarray, c: np.ndarray, tau: float) -> tuple[float, float]:
    """U-MARVEL's loss restated: q2c cross-entropy over every candidate (no masking) with targets
    b * (C / B), and c2q over the B queries for each target."""
    b, n = q.shape[0], c.shape[0]
    logits = q @ c.T / tau
    target = np.arange(b) * (n // b)

    def ce(x, t):
        x = x - x.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(x).sum(axis=1)) - x[np.arange(len(t)), t]))

    return ce(logits, target), ce(logits[:, target].T, np.arange(b))


def test_unmasked_loss_and_symmetric_sum_are_umarvels():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(4, 8)).astype(np.float32)
    c = rng.normal(size=(8, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    q2c, c2q = _reference_infonce(q.astype(np.float64), c.astype(np.float64), 0.05)
    index = np.arange(4) * 2
    loss, _ = info_nce(q, c, positive_index=index, temperature=0.05)
    assert float(loss) == pytest.approx(q2c, rel=1e-5)
    loss, _ = info_nce(q, c, positive_index=index, temperature=0.05, symmetric=True, symmetric_reduction="sum")
    assert float(loss) == pytest.approx(q2c + c2q, rel=1e-5)
    mean, _ = info_nce(q, c, positive_index=index, temperature=0.05, symmetric=True)
    assert float(mean) == pytest.approx((q2c + c2q) / 2, rel=1e-5)
    # mmret's masking (positive_mask) changes the loss: the switch matters
    mask = np.zeros((4, 8), bool)
    mask[0, 3] = True
    masked, _ = info_nce(q, c, positive_index=index, positive_mask=mask, temperature=0.05)
    assert float(masked) < q2c


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_shipped_config_and_preset_parses_with_its_stages():
    files = sorted((REPO / "configs").glob("*.py"))
    assert [f.stem for f in files] == ["jfe", "mmembed", "umarvel"]
    for path in files:
        module = _load(path)
        for preset in module.PRESETS:
            c = module.get_config(preset)
            if preset in (None, "mbeir", "qwen3vl_4b"):  # the paper presets name no paths: give them
                c = _with_paths(c)
            cfg = as_trainer_config(c)
            chain.check_stages(cfg)  # names, order, and every stage's merged config parses
            for stage in cfg.stages:
                s = chain.stage_config(cfg, stage.name, "/run")
                assert s.data.root and s.eval.root == "/data/M-BEIR" or preset == "demo", (path.name, stage.name)
        with pytest.raises(ValueError, match="unknown preset"):
            module.get_config("nope")


def test_umarvels_qwen3_vl_preset_is_the_chain_with_the_image_cap_in_qwen3_tokens():
    """U-MARVEL trains Qwen3-VL-4B "with the same stages": everything equal to the Qwen2-VL chain but the pixel cap,
    which keeps 300 visual tokens (and so 1,200 patch rows an image, the budgets' unit) at 32 x 32 pixels a token."""
    module = _load(REPO / "configs" / "umarvel.py")
    base, q3 = module.get_config(None).to_dict(), module.get_config("qwen3vl_4b").to_dict()
    assert q3["data"]["processor"].pop("max_pixels") == 300 * 32 * 32
    assert base["data"]["processor"].pop("max_pixels") == 300 * 28 * 28
    assert q3 == base
    for patch, pixels in ((14, 300 * 28 * 28), (16, 300 * 32 * 32)):
        assert pixels // patch**2 == 1200  # the per-image patch budget of the paper shapes (eval.max_patches / batch)
    assert base["eval"]["max_patches"] == module.PAPER_BATCH_PER_HOST * 1200


def test_mmembed_and_jfe_follow_their_papers_schedules():
    mm = as_trainer_config(_with_paths(_load(REPO / "configs" / "mmembed.py").get_config(None)))
    assert [s.name for s in mm.stages] == ["inbatch", "hardneg", "continual"]
    hardneg = chain.stage_config(mm, "hardneg", "/run")
    assert hardneg.model.init_from is None and mm.stages[1].mine_from == "inbatch"  # retrained from the base
    m = hardneg.mining
    assert (m.rule, m.top_k, m.modality_top, m.rank_cut) == ("mmembed", 50, 50, 45)
    continual = chain.stage_config(mm, "continual", "/run")
    assert continual.model.init_from == "/run/hardneg" and continual.optimizer.learning_rate == 2e-5
    assert continual.data.layout == "beir" and [s.layout for s in continual.data.mix] == ["mbeir"]
    # MM-Embed's zero-shot reranking: the untrained model source, True/False, P(True) alone on the top 10
    zs = as_trainer_config(_with_paths(_load(REPO / "configs" / "mmembed.py").get_config("zeroshot")))
    assert (zs.task, zs.rerank.prompt, zs.rerank.top_k, zs.rerank.cosine, zs.lora.rank) == (
        "reranker",
        "mmembed",
        10,
        False,
        0,
    )
    jfe = as_trainer_config(_with_paths(_load(REPO / "configs" / "jfe.py").get_config(None)))
    adapt, instruct = (chain.stage_config(jfe, n, "/run") for n in ("adapt", "instruct"))
    assert adapt.data.layout == "caption" and [s.layout for s in adapt.data.mix] == ["nli"] and adapt.symmetric
    assert instruct.model.init_from == "/run/adapt" and instruct.data.layout == "mbeir"
    assert adapt.encoder.fusion == instruct.encoder.fusion == "joint"


def _with_paths(c):
    c.unlock()
    c.model.hf_dir, c.data.root = "/models/Qwen2-VL-7B-Instruct", "/data/M-BEIR"
    for stage in c.get("stages", {}).values():
        data = stage.overrides.get("data", {})
        if "root" in data:
            data.root = "/data/pairs"
        for source in data.get("mix", {}).values():
            source.root = source.root or "/data/pairs"
    return c
