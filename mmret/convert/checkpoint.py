"""Orbax checkpoints of a backbone's parameters, with what an export back to Hugging Face needs.

A checkpoint directory holds::

    CKPT/params/               orbax PyTree checkpoint of numpy arrays in our parameter layout
                               (zarr arrays in 32 MiB chunks, uncompressed, no OCDBT: see _checkpointer)
    CKPT/mmret_checkpoint.json format, parameter layout (scan_layers), dtype, where it came from
    CKPT/hf_files/             the source config.json and tokenizer / processor files, byte for byte

    convert_from_hf(hf_dir, ckpt_dir)          # hub safetensors -> orbax, one tensor at a time
    model = load_model(ckpt_dir, dtype=jnp.bfloat16, scan_layers=False)
    save_model(new_ckpt_dir, model, hf_files_from=hf_files_dir(ckpt_dir))

The backbone is the one ``hf_files/config.json``'s ``model_type`` names (:mod:`mmret.models.registry`; its
conversion table from :mod:`mmret.convert.tables`).

A model whose vocabulary grew (``mmret.models.vocab.grow_vocab``, for tokens a processor added)
keeps it: ``save_params`` writes the embedding's row count as ``vocab_size`` into the kept config.json, and
``added_tokens`` (a processor's ``added_tokens``) into the kept tokenizer files, so the export and a
conversion back carry both.

Every directory is written beside its destination and renamed into place at the end; a failure
leaves nothing behind. Single-host: parameters are gathered to host numpy arrays.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmret.atomic_dir import atomic_output_dir, check_output
from mmret.convert import tables
from mmret.convert.hf import ConversionError, SafetensorsCheckpoint, read_params
from mmret.convert.load import config_from_hf, read_hf_config, resolve
from mmret.convert.table import ConversionTable
from mmret.models import registry
from mmret.models.backbone import Backbone
from mmret.models.options import as_dtype
from mmret.models.params import flat_params

if TYPE_CHECKING:
    from mmret.models.interface import BackboneConfig, BackboneModel

FORMAT = "mmret.params"
#: Formats read besides :data:`FORMAT` (same layout; written before the format named no backbone).
LEGACY_FORMATS = ("mmret.qwen2_vl.params",)
FORMAT_VERSION = 1
META_FILE = "mmret_checkpoint.json"
PARAMS_DIR = "params"
HF_FILES_DIR = "hf_files"
#: The small files of a hub model directory that a checkpoint keeps for the export back.
HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
DTYPES = ("float32", "bfloat16", "float16")
#: Arrays are stored in chunks of at most this size, so restoring one costs about one chunk beyond
#: the array itself (orbax reads a whole-array chunk through a second full-size buffer).
CHUNK_BYTES = 32 * 2**20
#: Arrays are restored in groups of about this many bytes: one orbax restore of a whole model reads
#: everything at once and its transient buffers reach 1.3x-1.7x the model (2B); groups keep ~1.1x.
RESTORE_GROUP_BYTES = 256 * 2**20

ParamPath = tuple[str | int, ...]
Progress = Callable[[int, int, str], None]  # (done, total, name)


# ---------------------------------------------------------------------------------------- helpers


def backbone_config(hf: dict[str, Any], where: str | Path, **options: Any) -> BackboneConfig:
    """The config of the backbone ``hf``'s ``model_type`` names, with ``options``; errors name ``where``."""
    spec, _ = resolve(hf, where)
    return config_from_hf(spec, hf, where, **options)


def dtype_name(dtype: Any) -> str:
    """'float32' / 'bfloat16' / 'float16' for a dtype or its name; other dtypes are refused."""
    try:
        name = np.dtype(as_dtype(dtype)).name
    except (TypeError, ValueError) as e:
        raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {list(DTYPES)}") from e
    if name not in DTYPES:
        raise ConversionError(f"unsupported dtype {name!r}; choose one of {list(DTYPES)}")
    return name


def _dotted(path: ParamPath) -> str:
    return ".".join(map(str, path))


def _nest(flat: Mapping[ParamPath, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, x in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = x
    return tree


def _flatten(tree: Mapping[str, Any], prefix: ParamPath = ()) -> dict[ParamPath, Any]:
    flat: dict[ParamPath, Any] = {}
    for k, v in tree.items():
        path = (*prefix, int(k) if k.isdigit() else k)
        if isinstance(v, Mapping):
            flat.update(_flatten(v, path))
        else:
            flat[path] = v
    return flat


def _drop_ocdbt_merge_warning(record: logging.LogRecord) -> bool:
    """Orbax warns after every non-OCDBT save that it found no OCDBT files to merge; that is expected."""
    return "Skipping merge of OCDBT checkpoints" not in str(record.msg)


def _checkpointer() -> Any:
    """A synchronous orbax checkpointer for host numpy trees that adds no copies of the model:
    no defensive deep copy of the arrays (the save is synchronous and nothing mutates them), no
    compression (it buffers compressed copies; weights barely compress) and no OCDBT (it holds the
    written data in memory until commit: about 1.8x the model at 2B parameters, against 1.1x)."""
    import orbax.checkpoint as ocp

    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),  # unused; silences a warning
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False, use_ocdbt=False)
    logging.getLogger("absl").addFilter(_drop_ocdbt_merge_warning)  # addFilter skips duplicates
    return ocp.Checkpointer(handler)


def with_vocab_size(hf: dict[str, Any], vocab_size: int) -> bool:
    """Set ``vocab_size`` in a config.json dict where it says one (top level and/or ``text_config``); whether
    anything changed."""
    holders = [d for d in (hf, hf.get("text_config")) if isinstance(d, dict) and "vocab_size" in d] or [hf]
    if all(d.get("vocab_size") == vocab_size for d in holders):
        return False
    for d in holders:
        d["vocab_size"] = vocab_size
    return True


def _set_vocab_size(hf_dir: Path, vocab_size: int) -> None:
    """Write ``vocab_size`` into ``hf_dir/config.json`` where it differs (:func:`with_vocab_size`)."""
    hf = read_hf_config(hf_dir)
    if with_vocab_size(hf, vocab_size):
        (hf_dir / "config.json").write_text(json.dumps(hf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def add_tokens_to_files(hf_dir: str | Path, tokens: Sequence[str]) -> dict[str, int]:
    """Add ``tokens`` (those missing, in order) to ``hf_dir``'s ``tokenizer.json`` as ``add_tokens`` adds
    them (not special, normalized; ids after the current size) and to the ``added_tokens_decoder`` of its
    ``tokenizer_config.json`` when it has one. Returns every token's id."""
    from tokenizers import Tokenizer

    hf_dir = Path(hf_dir)
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"{path}: missing (needed to add the tokens {list(tokens)})")
    tok = Tokenizer.from_file(str(path))
    known = {t.content for t in tok.get_added_tokens_decoder().values()}
    missing = [t for t in tokens if t not in known]
    for t in missing:
        tok.add_tokens([t])
    ids = {t: tok.token_to_id(t) for t in tokens}
    if not missing:
        return ids
    tok.save(str(path), pretty=True)
    config_path = hf_dir / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for t in missing:
                decoder[str(ids[t])] = {
                    "content": t,
                    "lstrip": False,
                    "normalized": True,
                    "rstrip": False,
                    "single_word": False,
                    "special": False,
                }
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return ids


def param_shapes(cfg: BackboneConfig) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    """Our parameters' shapes and dtypes for ``cfg``, without allocating anything."""
    state = nnx.state(registry.of_config(cfg).abstract(cfg), nnx.Param)
    return {path: var.get_value() for path, var in nnx.to_flat_state(state)}


# ----------------------------------------------------------------------------------- checkpoint


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What ``mmret_checkpoint.json`` and ``hf_files/config.json`` say about a checkpoint."""

    path: Path
    hf_config: dict[str, Any]
    scan_layers: bool  # the stored parameter layout
    dtype: str
    source: dict[str, Any]  # e.g. {"dir": ..., "keys": [hub keys of the source]}

    @property
    def backbone(self) -> Backbone:
        """The backbone the kept config.json names."""
        return resolve(self.hf_config, self.path / HF_FILES_DIR / "config.json")[0]

    @property
    def table(self) -> ConversionTable:
        """Its conversion table."""
        return resolve(self.hf_config, self.path / HF_FILES_DIR / "config.json")[1]

    def config(self, **options: Any) -> BackboneConfig:
        """The architecture, with ``options`` (default: the stored layout)."""
        options.setdefault("scan_layers", self.scan_layers)
        return backbone_config(self.hf_config, self.path / HF_FILES_DIR / "config.json", **options)


def hf_files_dir(ckpt_dir: str | Path) -> Path:
    """The checkpoint's copy of the source config / tokenizer / processor files."""
    return Path(ckpt_dir) / HF_FILES_DIR


def read_info(ckpt_dir: str | Path) -> CheckpointInfo:
    """Read a checkpoint's metadata; a clear error if ``ckpt_dir`` is not one of ours."""
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META_FILE
    if not meta_path.is_file():
        raise ConversionError(f"{meta_path}: missing; {ckpt_dir} is not an mmret checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
        fmt, version = meta["format"], int(meta["version"])
        scan_layers, dtype, source = bool(meta["scan_layers"]), str(meta["dtype"]), dict(meta.get("source", {}))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{meta_path}: not valid checkpoint metadata ({type(e).__name__}: {e})") from e
    if fmt != FORMAT and fmt not in LEGACY_FORMATS:
        raise ConversionError(f"{meta_path}: format is {fmt!r}, expected {FORMAT!r}")
    if version > FORMAT_VERSION:
        raise ConversionError(f"{meta_path}: version {version} is newer than this code's ({FORMAT_VERSION})")
    if not (ckpt_dir / PARAMS_DIR).is_dir():
        raise ConversionError(f"{ckpt_dir / PARAMS_DIR}: missing")
    hf_config = read_hf_config(ckpt_dir / HF_FILES_DIR)
    return CheckpointInfo(ckpt_dir, hf_config, scan_layers, dtype, source)


def save_params(
    ckpt_dir: str | Path,
    params: Mapping[ParamPath, Any],
    *,
    scan_layers: bool,
    hf_files_from: str | Path,
    force: bool = False,
    source: Mapping[str, Any] | None = None,
    added_tokens: Sequence[str] = (),
) -> Path:
    """Write ``params`` (flat path -> array, our layout; ``scan_layers`` says which) as an orbax
    checkpoint, with the config and tokenizer / processor files of ``hf_files_from`` (a hub model
    directory or another checkpoint's ``hf_files``; it must hold config.json). The kept config.json
    gets the embedding's row count as ``vocab_size``, the kept tokenizer the ``added_tokens`` it lacks
    (:func:`add_tokens_to_files`; they must fall inside the embedding). Atomic; single-host (arrays
    are gathered to host numpy)."""
    hf_files_from = Path(hf_files_from)
    embed_path = resolve(read_hf_config(hf_files_from), hf_files_from / "config.json")[0].embed_path
    import orbax.checkpoint as ocp

    arrays = {path: np.asarray(x) for path, x in params.items()}  # no copy for host arrays
    dtypes = sorted({x.dtype.name for x in arrays.values()})
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "scan_layers": bool(scan_layers),
        "dtype": dtypes[0] if len(dtypes) == 1 else "mixed",
        "source": dict(source or {}),
    }
    with atomic_output_dir(ckpt_dir, force=force) as tmp:
        tree = _nest(arrays)
        save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)
        _checkpointer().save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(tree, save_args=save_args))
        (tmp / HF_FILES_DIR).mkdir()
        for name in HF_FILES:
            if (hf_files_from / name).is_file():
                shutil.copyfile(hf_files_from / name, tmp / HF_FILES_DIR / name)
        rows = arrays[embed_path].shape[0] if embed_path in arrays else None
        if rows is not None:
            _set_vocab_size(tmp / HF_FILES_DIR, int(rows))
        if added_tokens:
            ids = add_tokens_to_files(tmp / HF_FILES_DIR, added_tokens)
            outside = {t: i for t, i in ids.items() if rows is not None and i >= rows}
            if outside:
                raise ConversionError(f"added tokens {outside} fall outside the {rows}-row token embedding")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return Path(ckpt_dir)


def save_model(
    ckpt_dir: str | Path,
    model: BackboneModel,
    *,
    hf_files_from: str | Path,
    force: bool = False,
    added_tokens: Sequence[str] = (),
) -> Path:
    """``save_params`` for a model (its parameters in its own layout). An untied model needs its
    ``lm_head`` (``with_lm_head=True``) for the checkpoint to export back to the hub. ``added_tokens``:
    the tokens a processor added for this model (``Processor.added_tokens``)."""
    return save_params(
        ckpt_dir,
        flat_params(model),
        scan_layers=model.cfg.scan_layers,
        hf_files_from=hf_files_from,
        force=force,
        added_tokens=added_tokens,
    )


def relayout(params: Mapping[ParamPath, np.ndarray], cfg: BackboneConfig, *, scan_layers: bool) -> dict[ParamPath, Any]:
    """Stack or unstack the block parameters: ``params`` are in ``cfg.scan_layers``'s layout, the
    result in ``scan_layers``'s. Driven by the conversion table's ``entries`` (matched by hub key)."""
    params = dict(params)
    if cfg.scan_layers == scan_layers:
        return params
    table = tables.of_config(cfg)
    src = {e.hub: e for e in table.entries(cfg, with_lm_head=True)}
    groups: dict[ParamPath, list] = {}
    for e in table.entries(cfg.replace(scan_layers=scan_layers), with_lm_head=True):
        groups.setdefault(e.path, []).append(e)
    known = {e.path for e in src.values()}
    unknown = sorted(set(params) - known, key=str)
    if unknown:
        raise ConversionError(f"checkpoint parameter {_dotted(unknown[0])} is not in the {table.name} mapping")
    out: dict[ParamPath, Any] = {}
    for path, group in groups.items():
        sources = [src[e.hub] for e in group]
        if sources[0].path not in params:
            continue  # e.g. no lm_head stored
        parts = [params[s.path] if s.layer is None else params[s.path][s.layer] for s in sources]
        out[path] = np.stack(parts) if group[0].layer is not None else parts[0]
        del parts
        for s in sources:
            if s.layer is None:  # unstacked sources are consumed (frees memory); stacked ones are viewed
                params.pop(s.path, None)
    return out


def restore_params(ckpt_dir: str | Path, *, scan_layers: bool | None = None) -> dict[ParamPath, np.ndarray]:
    """The checkpoint's parameters (flat path -> numpy array) in the stored layout, or stacked /
    unstacked to ``scan_layers`` when given."""
    import orbax.checkpoint as ocp

    info = read_info(ckpt_dir)
    directory = Path(ckpt_dir).absolute() / PARAMS_DIR
    checkpointer = _checkpointer()
    meta = checkpointer.metadata(directory)
    meta = getattr(meta, "item_metadata", meta)
    stored = _flatten(getattr(meta, "tree", meta))
    groups: list[list[ParamPath]] = [[]]
    size = 0
    for path, m in stored.items():
        nbytes = int(np.prod(m.shape, dtype=np.int64)) * np.dtype(m.dtype).itemsize
        if groups[-1] and size + nbytes > RESTORE_GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += nbytes
    params: dict[ParamPath, np.ndarray] = {}
    for group in groups:
        item = _nest({path: jax.ShapeDtypeStruct(stored[path].shape, stored[path].dtype) for path in group})
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        tree = checkpointer.restore(
            directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        )
        params.update((path, np.asarray(x)) for path, x in _flatten(tree).items())
    if scan_layers is None:
        return params
    return relayout(params, info.config(), scan_layers=scan_layers)


def load_model(
    ckpt_dir: str | Path, dtype: Any = jnp.float32, param_dtype: Any | None = None, **options: Any
) -> BackboneModel:
    """Restore a checkpoint into a model, like ``mmret.models.from_hf``: ``dtype`` is the compute dtype,
    parameters are cast to ``param_dtype`` (default ``dtype``); ``options`` are the backbone config's run
    options (``scan_layers``, ``with_lm_head``, ...), whatever layout the checkpoint stored."""
    dtype = as_dtype(dtype)
    param_dtype = dtype if param_dtype is None else as_dtype(param_dtype)
    info = read_info(ckpt_dir)
    cfg = info.config(dtype=dtype, param_dtype=param_dtype, **options)
    graphdef, state = nnx.split(info.backbone.abstract(cfg))
    flat = dict(nnx.to_flat_state(state))
    params = restore_params(ckpt_dir, scan_layers=cfg.scan_layers)
    for path, var in flat.items():
        if not isinstance(var, nnx.Param):
            continue
        if path not in params:
            raise ConversionError(f"{ckpt_dir}: checkpoint has no parameter {_dotted(path)}")
        x = params.pop(path)
        want = var.get_value()
        if tuple(x.shape) != tuple(want.shape):
            raise ConversionError(
                f"{ckpt_dir}: parameter {_dotted(path)} has shape {list(x.shape)}, the config implies "
                f"{list(want.shape)}"
            )
        var.set_value(jnp.asarray(x.astype(want.dtype, copy=False)))
        del x
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ------------------------------------------------------------------------------ hub -> checkpoint


def convert_from_hf(
    hf_dir: str | Path,
    out: str | Path,
    *,
    dtype: Any | None = None,
    scan_layers: bool = True,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Convert a hub model directory (safetensors) into an orbax checkpoint at ``out``.

    Tensors are read one at a time into their final arrays (peak host memory about one copy of the
    model). ``dtype`` defaults to the source's (bf16 stays bf16). An untied ``lm_head`` is kept."""
    hf_dir, out = Path(hf_dir), Path(out)
    check_output(out, force)
    ckpt = SafetensorsCheckpoint(hf_dir)
    hf = read_hf_config(hf_dir)
    spec, table = resolve(hf, hf_dir / "config.json")
    ckpt = ckpt.rekey(table.canonical_hub_key)
    name = dtype_name(ckpt.dtype() if dtype is None else dtype)
    cfg = config_from_hf(
        spec, hf, hf_dir / "config.json", scan_layers=scan_layers, with_lm_head=True, dtype=name, param_dtype=name
    )
    target = param_shapes(cfg)
    params: dict[ParamPath, np.ndarray] = {}
    for i, (path, x) in enumerate(read_params(ckpt, table, cfg, target, np.dtype(as_dtype(name))), 1):
        params[path] = x
        if progress:
            progress(i, len(target), _dotted(path))
    if progress:
        progress(len(target), len(target), f"writing {out}")
    dtypes = sorted(d.name for d in ckpt.dtypes())
    source = {"dir": str(hf_dir.absolute()), "dtype": "/".join(dtypes), "keys": sorted(ckpt.keys())}
    return save_params(out, params, scan_layers=scan_layers, hf_files_from=hf_dir, force=force, source=source)
