"""Export an mmret orbax checkpoint to a Hugging Face model directory (the backbone its config.json names).

Writes safetensors in the hub key layout (one ``model.safetensors``, or ``model-0000k-of-0000n``
shards plus ``model.safetensors.index.json`` above ``max_shard_size``), the source ``config.json``
and the tokenizer / processor files the checkpoint kept (with a grown ``vocab_size`` and the tokens a
processor added, when ``save_params`` was given them). The result loads with the transformers class of
the backbone (``Backbone.hf_model_class``, e.g. ``Qwen2VLForConditionalGeneration``) ``.from_pretrained``.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from mmret.atomic_dir import PathLike, absolute, as_path
from mmret.convert.checkpoint import (
    HF_FILES,
    ParamPath,
    Progress,
    atomic_output_dir,
    check_output,
    dtype_name,
    hf_files_dir,
    param_shapes,
    read_info,
    restore_params,
)
from mmret.convert.hf import INDEX_FILE, SINGLE_FILE, ConversionError, write_safetensors, write_tensors
from mmret.convert.table import ConversionTable

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})

Plan = list[tuple[str, Any, tuple[int, ...]]]  # (hub key, dtype, shape)


def parse_size(size: str | int) -> int:
    """Bytes in a size such as ``5GB`` (10^9, as Hugging Face counts), ``500MiB`` or ``1024``."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
        if not m or m.group(2).upper() not in _UNITS:
            raise ConversionError(f"bad size {size!r}; write e.g. 5GB, 500MB, 2GiB or a number of bytes")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ConversionError(f"size must be positive, got {size!r}")
    return value


def shard(plan: Plan, max_bytes: int) -> list[tuple[str, Plan]]:
    """Split the tensors in order into files of at most ``max_bytes`` (a larger tensor gets a file
    of its own), named as ``save_pretrained`` names them."""
    groups: list[Plan] = [[]]
    size = 0
    for item in plan:
        nbytes = int(np.prod(item[2], dtype=np.int64)) * np.dtype(item[1]).itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes
    if len(groups) == 1:
        return [(SINGLE_FILE, groups[0])]
    n = len(groups)
    return [(f"model-{k:05d}-of-{n:05d}.safetensors", g) for k, g in enumerate(groups, 1)]


def _config_bytes(raw: bytes, dtype: str | None) -> bytes:
    """A config.json's bytes, its ``dtype`` / ``torch_dtype`` updated when the written dtype differs."""
    if dtype is None:
        return raw
    hf = json.loads(raw)
    keys = [k for k in ("dtype", "torch_dtype") if k in hf and hf[k] != dtype]
    if not keys:
        return raw
    for k in keys:
        hf[k] = dtype
    return (json.dumps(hf, indent=2) + "\n").encode()


def export_to_hf(
    ckpt_dir: str | Path,
    out: PathLike,
    *,
    max_shard_size: str | int = "5GB",
    dtype: Any | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> epath.Path:
    """Write the checkpoint at ``ckpt_dir`` as a hub model directory ``out`` (atomically).

    Tensors keep the checkpoint's dtype unless ``dtype`` is given; each is laid out and written on
    its own, so peak host memory is about one copy of the parameters."""
    ckpt_dir, out = Path(ckpt_dir), as_path(out)
    check_output(out, force)
    if absolute(out) == absolute(ckpt_dir):
        raise ConversionError(f"{out}: the output cannot be the checkpoint itself")
    info = read_info(ckpt_dir)
    cfg = info.config(with_lm_head=True)
    table = info.table
    params = restore_params(ckpt_dir)
    # A tied model whose source file also held lm_head.weight (= the embedding) gets it back.
    extra = []
    if cfg.tie_word_embeddings and table.lm_head in info.source.get("keys", ()):
        embed = next(e for e in table.entries(cfg) if e.hub == table.embed)
        extra.append((table.lm_head, params[embed.path]))
    src = hf_files_dir(ckpt_dir)
    files: dict[str, bytes | Path] = {name: src / name for name in HF_FILES if (src / name).is_file()}
    return write_hub_dir(
        out,
        params,
        cfg,
        table,
        files=files,
        extra=extra,
        where=str(ckpt_dir),
        max_shard_size=max_shard_size,
        dtype=dtype,
        force=force,
        progress=progress,
    )


def write_hub_dir(
    out: PathLike,
    params: Mapping[ParamPath, Any],
    cfg: Any,
    table: ConversionTable,
    *,
    files: Mapping[str, bytes | PathLike],
    extra: Sequence[tuple[str, np.ndarray]] = (),
    where: str = "model",
    max_shard_size: str | int = "5GB",
    dtype: Any | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> epath.Path:
    """Write ``params`` (flat, our layout, of the backbone ``cfg`` with its LM head where untied) as a hub
    model directory ``out`` (atomically): safetensors in ``table``'s key layout (sharded above
    ``max_shard_size``), ``extra`` (hub key, hub-layout array) pairs after them, and ``files`` (name ->
    content, or a file to copy); ``config.json`` among them gets the written dtype. ``where`` names the
    parameters' origin in errors. ``out`` may be on any file system epath reaches (``gs://...``)."""
    out = as_path(out)
    check_output(out, force)
    max_bytes = parse_size(max_shard_size)
    out_dtype = None if dtype is None else np.dtype(dtype_name(dtype))
    expected = param_shapes(cfg)
    plan: Plan = []
    for e in table.entries(cfg, with_lm_head=True):
        if e.path not in params:
            raise ConversionError(f"{where}: no parameter {'.'.join(map(str, e.path))} (for {e.hub!r})")
        x = params[e.path]
        if tuple(x.shape) != tuple(expected[e.path].shape):
            raise ConversionError(
                f"{where}: parameter {'.'.join(map(str, e.path))} has shape {list(x.shape)}, "
                f"the config implies {list(expected[e.path].shape)}"
            )
        layer_shape = x.shape[1:] if e.layer is not None else x.shape
        plan.append((e.hub, out_dtype or x.dtype, table.hub_shape(cfg, e, layer_shape)))
    for key, x in extra:
        plan.append((key, out_dtype or x.dtype, tuple(x.shape)))

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        pairs = itertools.chain(write_tensors(dict(params), table, cfg, with_lm_head=True), extra)
        for n, (key, x) in enumerate(pairs, 1):
            x = np.asarray(x)
            yield key, x if out_dtype is None else x.astype(out_dtype, copy=False)
            if progress:
                progress(n, len(plan), key)

    shards = shard(plan, max_bytes)
    dtypes = {np.dtype(d).name for _, d, _ in plan}
    config_dtype = dtypes.pop() if len(dtypes) == 1 else None
    if "config.json" not in files:
        raise ConversionError(f"{where}: no config.json to write")
    with atomic_output_dir(out, force=force) as tmp:
        stream = tensors()
        for name, items in shards:
            write_safetensors(tmp / name, stream, items)
        if next(stream, None) is not None:
            raise ConversionError("internal error: more tensors than planned")
        if len(shards) > 1:
            total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, d, s in plan)
            index = {
                "metadata": {"total_size": total, "total_parameters": sum(int(np.prod(s)) for _, _, s in plan)},
                "weight_map": {key: name for name, items in shards for key, _, _ in items},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for name, content in files.items():
            data = content if isinstance(content, bytes) else as_path(content).read_bytes()
            if name == "config.json":
                data = _config_bytes(data, config_dtype)
            (tmp / name).write_bytes(data)
    return out
