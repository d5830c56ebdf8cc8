"""Every parameter carries logical axis names; the model imports no data/search/torch libraries."""

from __future__ import annotations

import subprocess
import sys

import jax
import pytest
from flax import nnx

from mmret.models import qwen2_vl
from mmret.models.partitioning import LOGICAL_AXES, logical, logical_axes
from mmret.models.qwen2_vl.presets import hf_config


@pytest.mark.parametrize("scan", [True, False])
def test_every_parameter_has_one_logical_name_per_dim(scan):
    cfg = qwen2_vl.Qwen2VLConfig.from_hf_dict(hf_config("qwen2vl-7b"), scan_layers=scan, with_lm_head=True)
    model = qwen2_vl.abstract(cfg)  # shapes only: the 7B is never materialised
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
        "bad = [m for m in ('torch', 'grain', 'scann', 'tensorflow_datasets', 'tensorflow') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
