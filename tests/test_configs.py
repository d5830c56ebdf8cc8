"""The shipped recipe configs state the papers' values; epochs become steps from the training file's size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from mmret.losses import info_nce
from mmret.recipe import as_trainer_config, with_epochs

REPO = Path(__file__).resolve().parents[1]


def umarvel(arg: str | None = None):
    spec = importlib.util.spec_from_file_location("umarvel_config", REPO / "configs" / "umarvel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.unlock()
    if arg is None:
        c.model.hf_dir, c.data.root = "/models/Qwen2-VL-7B-Instruct", "/data/M-BEIR"
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
    demo = umarvel("demo")
    assert demo.epochs is None and with_epochs(demo, 3328, 64).steps == 600  # a fixed length


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
