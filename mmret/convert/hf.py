"""Read and write Hugging Face checkpoints (safetensors only), one tensor at a time, through a backbone's
conversion table (:mod:`mmret.convert.table`)."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from mmret.atomic_dir import PathLike, as_path
from mmret.convert.table import ConversionTable, Entry, to_hub, to_ours

if TYPE_CHECKING:
    from mmret.models.interface import BackboneConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the key or file."""


#: safetensors dtype names <-> numpy dtypes (bfloat16 / float8 from ml_dtypes).
ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_ST_NAMES = {dt: name for name, dt in ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    key: str  # the key as stored in the file
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors file's header (no tensor data is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(_MAX_HEADER, size - 8):
                raise ConversionError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    out = {}
    for key, spec in header.items():
        try:
            dtype_name, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{path}: malformed header entry for {key!r}") from e
        if dtype_name not in ST_DTYPES:
            raise ConversionError(f"{path}: tensor {key!r} has unsupported dtype {dtype_name}")
        dtype = ST_DTYPES[dtype_name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or 8 + n + end > size:
            raise ConversionError(f"{path}: tensor {key!r} has inconsistent offsets (truncated file?)")
        out[key] = TensorInfo(path, key, dtype, shape, 8 + n + begin, nbytes)
    return out


class SafetensorsCheckpoint:
    """A Hugging Face model directory's tensors, read lazily by hub key.

    Keys are as stored, or as ``canonical_key`` maps them (a conversion table's
    ``canonical_hub_key``: one name whichever transformers layout saved the file; see :meth:`rekey`).
    Tensors are read with plain file reads (no mmap), so reading one costs one copy of it and
    nothing stays resident afterwards; bfloat16 and float8 come back as ``ml_dtypes`` arrays.
    """

    def __init__(self, hf_dir: str | Path, canonical_key: Callable[[str], str] | None = None):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ConversionError(f"{self.dir}: " + ("not a directory" if self.dir.exists() else "no such directory"))
        pickles = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt"))
        index = self.dir / INDEX_FILE
        single = self.dir / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a safetensors index ({e})") from e
        elif single.is_file():
            weight_map = {k: SINGLE_FILE for k in read_header(single)}
        elif pickles:
            raise ConversionError(
                f"{self.dir / pickles[0]}: pickle checkpoints are refused (they can run code when loaded): weights are "
                f"read from safetensors only ({SINGLE_FILE} or {INDEX_FILE}); convert it to safetensors first"
            )
        else:
            raise ConversionError(
                f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} (weights are read from safetensors only)"
            )
        headers: dict[str, dict[str, TensorInfo]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for key, file in weight_map.items():
            if file not in headers:
                path = self.dir / file
                if not path.is_file():
                    raise ConversionError(f"{path}: listed in {INDEX_FILE} for {key!r} but missing")
                headers[file] = read_header(path)
            if key not in headers[file]:
                raise ConversionError(f"{self.dir / file}: has no tensor {key!r} (listed in {INDEX_FILE})")
            self.tensors[key] = headers[file][key]
        if canonical_key is not None:
            self.tensors = self._canonical(canonical_key)

    def _canonical(self, canonical_key: Callable[[str], str]) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for key, info in self.tensors.items():
            canonical = canonical_key(key)
            if canonical in out:
                raise ConversionError(f"{self.dir}: tensor {canonical!r} is stored twice (as {key!r})")
            out[canonical] = info
        return out

    def rekey(self, canonical_key: Callable[[str], str]) -> SafetensorsCheckpoint:
        """The same tensors under ``canonical_key(key)`` (an error if two keys map to one name)."""
        other = copy.copy(self)
        other.tensors = self._canonical(canonical_key)
        return other

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, key: str) -> TensorInfo:
        if key not in self.tensors:
            raise ConversionError(f"{self.dir}: missing tensor {key!r}")
        return self.tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def get(self, key: str) -> np.ndarray:
        """Read one tensor into a fresh array."""
        t = self.info(key)
        out = np.empty(t.shape, t.dtype)
        with open(t.file, "rb") as f:
            f.seek(t.offset)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != t.nbytes:
            raise ConversionError(f"{t.file}: tensor {key!r} is truncated")
        return out

    def dtypes(self) -> set[np.dtype]:
        """The dtypes of all tensors (hub checkpoints normally hold one)."""
        return {t.dtype for t in self.tensors.values()}

    def dtype(self) -> np.dtype:
        """The checkpoint's one dtype; an error if it mixes several."""
        found = self.dtypes()
        if len(found) != 1:
            raise ConversionError(
                f"{self.dir}: tensors have mixed dtypes {sorted(map(str, found))}; choose one (--dtype)"
            )
        return found.pop()


def write_safetensors(
    path: PathLike, tensors: Iterator[tuple[str, np.ndarray]], plan: list[tuple[str, Any, tuple[int, ...]]]
) -> None:
    """Stream tensors into one safetensors file. ``plan`` lists (key, dtype, shape) in the order the
    (key, array) pairs come, so the header goes first and each tensor is written and dropped; exactly
    ``len(plan)`` pairs are taken from ``tensors`` (so one iterator can feed several shards)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in plan:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {
            "dtype": _ST_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with as_path(path).open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, dtype, shape in plan:
            got_key, x = next(tensors, (None, None))
            if got_key != key or x is None or x.dtype != np.dtype(dtype) or tuple(x.shape) != tuple(shape):
                got = None if x is None else f"{got_key!r} {x.dtype} {list(x.shape)}"
                raise ConversionError(f"{path}: expected tensor {key!r} {dtype} {list(shape)}, got {got}")
            f.write(memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))


def read_params(
    ckpt: SafetensorsCheckpoint,
    table: ConversionTable,
    cfg: BackboneConfig,
    target: dict[tuple, Any],
    dtype: Any,
) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yield (our path, array in ``dtype``) for every parameter of ``target`` (a flat dict of path ->
    ShapeDtypeStruct), reading one hub tensor at a time through ``table`` and checking every shape.

    Stacked parameters are assembled in one preallocated array. Unmapped hub tensors are an error,
    except a tied (or headless) model's redundant LM head.
    """
    ckpt = ckpt.rekey(table.canonical_hub_key)
    mapped = table.entries(cfg)
    known = {e.hub for e in mapped}
    if not table.has_head(cfg):
        known.add(table.lm_head)
    unexpected = sorted(set(ckpt.keys()) - known)
    if unexpected:
        raise ConversionError(
            f"{ckpt.dir}: {len(unexpected)} tensors the {table.name} mapping does not know, e.g. {unexpected[:3]}"
        )
    by_path: dict[tuple, list[Entry]] = {}
    for e in mapped:
        by_path.setdefault(e.path, []).append(e)
    missing = sorted(set(target) - set(by_path), key=str)
    if missing:
        raise ConversionError(f"no mapping for parameters {missing[:3]}")
    missing_hub = [e.hub for e in mapped if e.hub not in ckpt.tensors]
    if missing_hub:
        more = f" (and {len(missing_hub) - 1} more)" if len(missing_hub) > 1 else ""
        raise ConversionError(f"{ckpt.dir}: missing tensor {missing_hub[0]!r}{more}")
    for path, group in by_path.items():  # check every shape before reading anything
        if path not in target:
            raise ConversionError(f"mapping names {'.'.join(map(str, path))}, which the model does not have")
        want = tuple(target[path].shape)
        layer_shape = want[1:] if group[0].layer is not None else want
        for e in group:
            expect = table.hub_shape(cfg, e, layer_shape)
            got = ckpt.shape(e.hub)
            if got != expect:
                raise ConversionError(
                    f"{ckpt.dir}: tensor {e.hub!r} has shape {list(got)}, the config implies {list(expect)}"
                )
    for path, group in by_path.items():
        want = tuple(target[path].shape)
        out = np.empty(want, dtype) if group[0].layer is not None else None
        for e in group:
            x = to_ours(ckpt.get(e.hub), e.kind).astype(dtype, copy=False)
            if out is None:
                out = x
            else:
                out[e.layer] = x
            del x
        yield path, out


def write_tensors(
    params: dict[tuple, np.ndarray], table: ConversionTable, cfg: BackboneConfig, *, with_lm_head: bool
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (hub key, hub-layout array) from our flat params, in table order."""
    for e in table.entries(cfg, with_lm_head=with_lm_head):
        x = np.asarray(params[e.path])
        if e.layer is not None:
            x = x[e.layer]
        yield e.hub, to_hub(x, e.kind, table.hub_shape(cfg, e, x.shape))
