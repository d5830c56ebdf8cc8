"""Every parameter carries logical axis names; the model imports no data/search/torch libraries."""

from __future__ import annotations

import subprocess
import sys

import jax
import pytest
from flax import nnx

from mmret import models
from mmret.models.partitioning import LOGICAL_AXES, logical, logical_axes


@pytest.mark.parametrize("preset", ["qwen2vl-7b", "qwen2.5vl-7b", "qwen3vl-8b"])
@pytest.mark.parametrize("scan", [True, False])
def test_every_parameter_has_one_logical_name_per_dim(scan, preset):
    spec = models.find_preset(preset)
    model = spec.abstract(spec.config(models.preset_config(preset), scan_layers=scan, with_lm_head=True))  # shapes only
    params = nnx.state(model, nnx.Param)
    specs = logical_axes(params)
    shapes = jax.tree.leaves(params)
    names = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(shapes) == len(names) > 10
    for shape, spec in zip(shapes, names, strict=True):
        assert len(spec) == len(shape.shape), (spec, shape.shape)
        assert all(n in LOGICAL_AXES for n in spec), spec
    stacked = [s for s in names if s and s[0] == "layers"]
    assert bool(stacked) == scan  # scanned blocks carry the stacked "layers" axis


def test_unknown_logical_name_is_rejected():
    with pytest.raises(ValueError, match="unknown logical axis"):
        logical(nnx.initializers.zeros_init(), "embedd")


def test_model_code_imports_no_torch_grain_scann_or_tfds():
    code = (
        "import sys; import mmret.models.qwen2_vl as q; from mmret.models.qwen2_vl import hf; "
        "import mmret.models.qwen2_5_vl, mmret.models.qwen3_vl; "
        "bad = [m for m in ('torch', 'grain', 'scann', 'tensorflow_datasets', 'tensorflow') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
