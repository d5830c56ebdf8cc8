"""Embedding export: M-BEIR test queries and candidate pools -> float16 shards on disk, resumable.

An embeddings directory::

    embeddings.json                   what made them: model source and step, encoder, processor, root, ...
    queries/<task>/group.json         {"count": n, "shards": k}
    queries/<task>/shard-00000.npz    ``embeddings`` [m, D] float16 and ``ids`` [m], in file order
    pools/local/<task>/...            the task's local pool (candidates get no instruction)
    pools/global/members.json         the union pool's dids, in file order
    pools/global/extra/...            only union-pool candidates that are in no local pool

The union pool is the 16 local pools concatenated, so the global pool reuses the local pools'
embeddings: no candidate is embedded twice. A shard is written atomically once complete; a rerun
skips finished shards (resumption after a crash).

Reuse is keyed (:func:`embed_key`, the manifest less ``dim`` and ``skipped``): the model (run and step,
with the checkpoint directory's mtime; or the model source, with the size and mtime of its top-level
files), the processor files, the model / LoRA / encoder / processor settings, the embedding settings,
the tasks and pools, the M-BEIR root and a fingerprint of every record file read (the query files,
pools and instructions: size and mtime_ns each, :func:`file_stamps`, whole seconds on an object store;
no content hashing, so a file rewritten with its size and mtime restored goes unnoticed, and image
files are not stamped). When the key of an existing directory differs in anything, the whole directory
is recomputed: it is removed (:func:`replace_stale`) and embedded anew, so shards of two keys never mix.

The root and the output may be on any file system :mod:`etils.epath` reads (``gs://`` included; see
:mod:`mmret.atomic_dir` for what atomic writes mean there).

Test queries are checked like training queries: each query's own-dataset positives
(:func:`mmret.data.mbeir.restrict_positives`; OVEN/InfoSeek's copies in the other dataset are only in
the global pool) must be in its task's local pool, else a ``positive_not_in_pool`` bad record.
``eval.on_bad_record="skip"`` counts and drops bad records (the manifest's ``skipped``; the report
lists them and is then not complete); ``"error"`` (default) stops with the record's file and line.

Data-parallel over every device of every host: each shard's items are split into one contiguous part
per host, every host runs the same number of batches (padding slots are flagged invalid), the batch is
sharded over the mesh's data x fsdp axes, and the primary process writes the gathered embeddings.

    python tools/embed.py --workdir RUN [--step N] --out DIR       # a training run's checkpoint
    python tools/embed.py --hf_dir MODEL --mbeir_root ROOT --out DIR  # a Hugging Face model directory
    python -m mmret.launch --config=... --workdir=RUN --mode=embed
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from mmret import sharding
from mmret.atomic_dir import PathLike, absolute, as_path, is_local, stamp, write_atomic
from mmret.build import processor_dir
from mmret.checkpoints import load_trained, resolve_step, step_dir
from mmret.data import packing
from mmret.data.bad_records import BadRecords
from mmret.data.mbeir import EVAL_TASKS, dataset_task, input_files, pool_tasks
from mmret.data.pipeline import candidate_dataset, query_dataset
from mmret.data.processor import Processor
from mmret.data.stores import EvalStore
from mmret.models.encoder import Encoder
from mmret.progress import format_duration, progress
from mmret.recipe import EvalConfig, TrainerConfig, config_to_json

log = logging.getLogger("mmret.eval")

MANIFEST = "embeddings.json"
GROUP = "group.json"
MEMBERS = "members.json"


# ============================================================================================ the model


def load_encoder(
    cfg: TrainerConfig, *, workdir: PathLike | None = None, step: int = 0, max_image_patches: int = 0
) -> Encoder:
    """The embedder of a run of ``cfg`` at ``step`` (0: before training, i.e. the model source), with
    LoRA adapters merged into plain weights; in host memory (:func:`mmret.checkpoints.load_trained`)."""
    return load_trained(cfg, workdir, step, max_image_patches=max_image_patches).encoder


def source_of(cfg: TrainerConfig, workdir: PathLike | None, step: int) -> dict[str, Any]:
    """What an embeddings directory was made from (compared on resumption): a run's checkpoint (its
    directory's mtime_ns, which a checkpoint saved anew under the same step changes), or the model
    source with the size and mtime of the files directly in it."""
    m = cfg.model
    if workdir is not None and step:
        ckpt = step_dir(workdir, step)
        return {"workdir": absolute(workdir), "step": step, "mtime_ns": stamp(ckpt)[1]}
    source: dict[str, Any] = {"hf_dir": m.hf_dir, "checkpoint": m.checkpoint, "preset": m.preset, "seed": m.seed}
    if workdir is not None:
        source = {"workdir": absolute(workdir), "step": 0, **source}
    for key in ("hf_dir", "checkpoint"):
        if source[key]:
            source["files"] = dir_stamps(source[key])
    return source


def file_stamps(root: PathLike, paths: Sequence[PathLike]) -> dict[str, list[int]]:
    """``path relative to root -> [size, mtime_ns]`` of each file (:func:`mmret.atomic_dir.stamp`; all must exist)."""
    root = as_path(root)
    out = {}
    for p in map(as_path, paths):
        out[p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)] = stamp(p)
    return out


def dir_stamps(directory: PathLike) -> dict[str, list[int]]:
    """:func:`mmret.atomic_dir.stamp` of each file directly in ``directory`` (subdirectories: their mtime only)."""
    d = as_path(directory)
    if not d.is_dir():
        return {}
    return {p.name: stamp(p) if p.is_file() else [0, stamp(p)[1]] for p in sorted(d.iterdir())}


# ============================================================================================= the work


@dataclasses.dataclass
class Group:
    """Items embedded into one directory of shards: a task's queries, a pool, the global extras."""

    name: str  # relative directory, e.g. "queries/visualnews_task0"
    kind: str  # "query" | "candidate"
    items: list[Any]  # Query objects or dids

    def ids(self, items: Sequence[Any]) -> list[str]:
        return [q.qid for q in items] if self.kind == "query" else list(items)


def groups(store: EvalStore, tasks: Sequence[str], pools: Sequence[str]) -> list[Group]:
    """What ``store`` embeds: each task's queries, each local pool read, and with the global pool its
    candidates that are in no local pool (the rest reuse the local pools' embeddings)."""
    out = [Group(f"queries/{t}", "query", store.task_queries[t]) for t in tasks]
    out += [Group(f"pools/local/{t}", "candidate", list(p)) for t, p in store.pools.items()]
    if "global" in pools:
        local = set().union(*(p.keys() for p in store.pools.values())) if store.pools else set()
        out.append(Group("pools/global/extra", "candidate", [d for d in store.members if d not in local]))
    return out


# ============================================================================================ embedding


def write_json(path: PathLike, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.npz"


def _primary_view(values: np.ndarray) -> np.ndarray:
    """``values`` as the primary process has them (every host must agree on what is done)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        values = np.asarray(multihost_utils.broadcast_one_to_all(values))
    return values


def _done_shards(directory: epath.Path, n: int) -> np.ndarray:
    """Which of ``n`` shards exist, as the primary process sees them."""
    return _primary_view(np.array([(directory / shard_name(i)).is_file() for i in range(n)], dtype=bool))


def _finished(out: epath.Path, key: dict[str, Any]) -> bool:
    """Whether ``out`` holds every group of ``key`` complete under that very key (then nothing is read
    or loaded), as the primary process sees it."""
    names = [f"queries/{t}" for t in key["tasks"]]
    names += [f"pools/local/{t}" for t in pool_tasks(key["mbeir_root"], key["split"], key["tasks"], key["pools"])]
    names += ["pools/global/extra"] if "global" in key["pools"] else []
    done = (out / MANIFEST).is_file() and stale_reason(out, key) is None
    done = done and ("global" not in key["pools"] or (out / "pools" / "global" / MEMBERS).is_file())
    for name in names if done else []:
        info = out / name / GROUP
        shards = json.loads(info.read_text())["shards"] if info.is_file() else -1
        done = done and shards >= 0 and all((out / name / shard_name(i)).is_file() for i in range(shards))
    return bool(_primary_view(np.array([done]))[0])


@dataclasses.dataclass(frozen=True)
class Shapes:
    batch_size: int  # per host
    max_length: int
    max_patches: int


def eval_shapes(cfg: TrainerConfig, ecfg: EvalConfig) -> Shapes:
    """Static batch shapes for embedding (the ``eval`` fields, else the training pipeline's)."""
    p = cfg.data.pipeline
    batch = ecfg.batch_size or p.batch_size
    length = ecfg.max_length or max(p.max_query_length, p.max_candidate_length)
    per_example = max(p.max_query_patches, p.max_candidate_patches) / p.batch_size
    patches = ecfg.max_patches or 4 * math.ceil(per_example * batch / 4)
    return Shapes(batch, length, patches)


class Embedder:
    """The jitted, data-parallel embedding function of an encoder on a mesh."""

    def __init__(self, encoder: Encoder, cfg: TrainerConfig):
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.rules = sharding.make_rules(overrides=cfg.rules)
        with jax.set_mesh(self.mesh), sharding.axis_rules(self.rules):
            sharding.place_model(encoder, self.mesh, self.rules)
        graphdef, state = nnx.split(encoder)
        self.state = state
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.dim = encoder.backbone.cfg.text.hidden_size

        def embed(state: nnx.State, batch: dict[str, Any]) -> jax.Array:
            return nnx.merge(graphdef, state)(batch)

        self._fn = jax.jit(embed, out_shardings=replicated)

    def __call__(self, host_batch: dict[str, Any]) -> jax.Array:
        """Embeddings [hosts * batch, D] of the global batch (every host's block, host-major), replicated."""
        arrays = {k: v for k, v in host_batch.items() if k not in ("meta", "valid")}
        if packing.is_packed(arrays):  # every process's block takes the most rows any needs
            arrays = packing.globalize(arrays)
        with jax.set_mesh(self.mesh), sharding.axis_rules(self.rules):
            batch = sharding.put_batch(arrays, self.mesh, self.rules)
            return self._fn(self.state, batch)


def _host_slots(items: Sequence[Any], batch: int) -> tuple[list[Any], list[int]]:
    """This host's contiguous part of ``items`` padded with ``None`` to the number of batches every
    host runs, and each host's part length (for reassembly)."""
    hosts, me = jax.process_count(), jax.process_index()
    per = math.ceil(len(items) / hosts)
    lengths = [max(0, min(per, len(items) - h * per)) for h in range(hosts)]
    n_batches = max(1, math.ceil(per / batch))
    mine = list(items[me * per : me * per + lengths[me]])
    return mine + [None] * (n_batches * batch - len(mine)), lengths


def embed_group(
    group: Group,
    out: epath.Path,
    store: EvalStore,
    processor: Processor,
    embedder: Embedder,
    shapes: Shapes,
    ecfg: EvalConfig,
) -> int:
    """Embed ``group`` into ``out/<group.name>/``, skipping finished shards; returns items embedded now."""
    directory = out / group.name
    n_shards = math.ceil(len(group.items) / ecfg.shard_size)
    primary = jax.process_index() == 0
    if primary:
        write_json(directory / GROUP, {"count": len(group.items), "shards": n_shards})
    done = _done_shards(directory, n_shards)
    todo = [i for i in range(n_shards) if not done[i]]
    if not todo:
        return 0
    parts: list[tuple[int, list[Any], list[int]]] = []  # shard, its items, each host's part length
    slots: list[Any] = []
    for i in todo:
        items = group.items[i * ecfg.shard_size : (i + 1) * ecfg.shard_size]
        mine, lengths = _host_slots(items, shapes.batch_size)
        parts.append((i, items, lengths))
        slots += mine
    kw = dict(
        batch_size=shapes.batch_size,
        max_length=shapes.max_length,
        max_patches=shapes.max_patches,
        padding_side="right",  # the encoder pools by mask: either side gives the same embeddings
        num_workers=ecfg.num_workers,
        max_decode_pixels=ecfg.max_decode_pixels,
        process_index=0,
        process_count=1,
        packs=ecfg.packing,
    )
    if group.kind == "query":
        ds = query_dataset(store, processor, queries=slots, instruction_seed=ecfg.instruction_seed, **kw)
    else:
        ds = candidate_dataset(store, slots, processor, **kw)
    batches = iter(ds)
    total = sum(len(items) for _, items, _ in parts)
    bar = progress(total, f"embed {group.name}", unit="item", out=sys.stdout, disable=jax.process_index() != 0)
    for i, items, lengths in parts:
        n_batches = max(1, math.ceil(max(lengths) / shapes.batch_size))
        outputs = [embedder(next(batches)) for _ in range(n_batches)]  # dispatched asynchronously
        hosts = jax.process_count()
        emb = np.stack([np.asarray(o.addressable_data(0)) for o in outputs])  # [batches, hosts * B, D]
        emb = emb.reshape(n_batches, hosts, shapes.batch_size, -1).transpose(1, 0, 2, 3)
        emb = emb.reshape(hosts, n_batches * shapes.batch_size, -1)
        vectors = np.concatenate([emb[h, : lengths[h]] for h in range(hosts)]).astype(np.float16)
        if primary:
            ids = np.asarray(group.ids(items))
            write_atomic(directory / shard_name(i), lambda f, v=vectors, d=ids: np.savez(f, embeddings=v, ids=d))
        bar.update(len(items))
    bar.close()
    return total


#: Manifest fields that are results, not part of the key.
MANIFEST_OUTPUTS = ("dim", "skipped")


def eval_tasks_of(ecfg: EvalConfig) -> list[str]:
    """The dataset-task names ``ecfg`` evaluates (default: the 16), in the given order."""
    return [dataset_task(t).name for t in (ecfg.tasks or [t.name for t in EVAL_TASKS])]


def eval_root(cfg: TrainerConfig, ecfg: EvalConfig) -> str:
    root = ecfg.root or cfg.data.root
    if not root:
        raise ValueError("eval.root: no M-BEIR root given (nor data.root)")
    return root


def embed_key(
    cfg: TrainerConfig, ecfg: EvalConfig, *, workdir: PathLike | None = None, step: int = 0
) -> dict[str, Any]:
    """Everything an embeddings directory depends on (see the module docstring); JSON-ready, cheap (file
    stats only). Raises ``FileNotFoundError`` for a missing root or record file."""
    root = eval_root(cfg, ecfg)
    tasks = eval_tasks_of(ecfg)
    shapes = eval_shapes(cfg, ecfg)
    files = input_files(root, ecfg.split, tasks, ecfg.pools)
    key = {
        "version": 2,
        "source": source_of(cfg, workdir, step),
        "mbeir_root": absolute(root),
        "split": ecfg.split,
        "tasks": tasks,
        "pools": list(ecfg.pools),
        "data_files": file_stamps(root, files),
        "processor_files": dir_stamps(processor_dir(cfg)),
        "dtype": "float16",
        "shard_size": ecfg.shard_size,
        "instruction_seed": ecfg.instruction_seed,
        **({"query_sample": [ecfg.query_fraction, ecfg.query_seed]} if ecfg.query_fraction < 1 else {}),
        "max_length": shapes.max_length,
        "max_decode_pixels": ecfg.max_decode_pixels,
        "on_bad_record": ecfg.on_bad_record,
        "encoder": config_to_json(cfg.encoder),
        "processor": config_to_json(cfg.data.processor),
        "model": config_to_json(cfg.model),
        "lora": config_to_json(cfg.lora),
    }
    return json.loads(json.dumps(key))  # tuples as lists: equal to the key read back from a manifest


def key_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The key part of a manifest (:func:`embed_key`)."""
    return {k: v for k, v in manifest.items() if k not in MANIFEST_OUTPUTS}


def stale_reason(directory: PathLike, key: dict[str, Any]) -> str | None:
    """Why the embeddings in ``directory`` cannot be reused for ``key`` (the differing fields, e.g.
    ``data_files (cand_pool/local/x.jsonl)``), or None when they can (or there is nothing there)."""
    path = as_path(directory) / MANIFEST
    if not path.is_file():
        return None
    old = key_of(json.loads(path.read_text()))
    differ = []
    for k in sorted(set(old) | set(key)):
        if old.get(k) == key.get(k):
            continue
        if k == "data_files" and isinstance(old.get(k), dict):
            a, b = old[k], key[k]
            names = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
            k += f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        differ.append(k)
    return ", ".join(differ) or None


#: What an embeddings directory holds (anything else there stops a replacement).
_EMBEDDINGS_ENTRIES = {MANIFEST, "queries", "pools"}


def replace_stale(directory: PathLike, reason: str) -> None:
    """Remove an embeddings directory made for another key: on a local disk renamed away in one atomic
    step, then deleted; on an object store (where a rename is a copy) deleted in place, the manifest
    last, so that an interrupted removal still reads as stale. Refuses a directory holding anything an
    embedding run does not write."""
    directory = as_path(directory)
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in _EMBEDDINGS_ENTRIES and p.name[0] != ".")
    if foreign:
        raise ValueError(
            f"{directory}: the embeddings there are stale ({reason}) but the directory also holds "
            f"{', '.join(foreign[:3])}: not deleting it; remove it or write to a new directory"
        )
    print(f"embeddings in {directory} are stale ({reason} changed): recomputing them", flush=True)
    if not is_local(directory):
        for p in directory.iterdir():
            if p.name in _EMBEDDINGS_ENTRIES - {MANIFEST}:
                p.rmtree()
        (directory / MANIFEST).unlink(missing_ok=True)
        return
    trash = directory.with_name(f".{directory.name}.stale-{os.getpid()}-{time.time_ns()}")
    directory.rename(trash)
    shutil.rmtree(trash)


def embed(
    cfg: TrainerConfig,
    out: PathLike,
    ecfg: EvalConfig | None = None,
    *,
    workdir: PathLike | None = None,
    step: int | None = None,
    encoder: Encoder | None = None,
) -> epath.Path:
    """Embed the test queries and pools of ``ecfg`` into ``out``; resumable. With ``workdir`` the model
    is that run's checkpoint ``step`` (None: the latest; 0: the model before training); else the
    model source of ``cfg.model``. ``encoder`` skips loading (it must be what those arguments name)."""
    ecfg = cfg.eval if ecfg is None else ecfg
    out = as_path(out)
    root = eval_root(cfg, ecfg)
    if workdir is not None:
        step = resolve_step(workdir, step)
    key = embed_key(cfg, ecfg, workdir=workdir, step=step or 0)
    tasks = key["tasks"]
    shapes = eval_shapes(cfg, ecfg)

    started = time.perf_counter()
    if _finished(out, key):
        if jax.process_index() == 0:
            print(f"embeddings in {out}: complete, reused (nothing they depend on changed)", flush=True)
        return out
    if jax.process_index() == 0 and (reason := stale_reason(out, key)):
        replace_stale(out, reason)  # the other hosts follow the primary's view of the shards (_done_shards)
    bad = BadRecords(ecfg.on_bad_record)
    store = EvalStore(
        root, ecfg.split, tasks, ecfg.pools, bad, query_fraction=ecfg.query_fraction, query_seed=ecfg.query_seed
    )
    skipped = store.skipped()
    if skipped and jax.process_index() == 0:
        for name, b in [*store.query_bad.items(), ("other records", bad)]:
            if b.total:
                print(f"eval.on_bad_record='skip', {name}: " + "\n".join(b.report()), flush=True)
    processor = Processor(processor_dir(cfg), cfg.data.processor)
    if encoder is None:
        encoder = load_encoder(cfg, workdir=workdir, step=step or 0, max_image_patches=processor.patcher.max_patches)
    embedder = Embedder(encoder, cfg)
    path = out / MANIFEST
    if jax.process_index() == 0:
        write_json(path, {**key, "dim": embedder.dim, "skipped": skipped})
        if "global" in ecfg.pools:
            write_json(out / "pools" / "global" / MEMBERS, store.members)
    embedded = 0
    for group in groups(store, tasks, ecfg.pools):
        embedded += embed_group(group, out, store, processor, embedder, shapes, ecfg)
    seconds = time.perf_counter() - started
    if jax.process_index() == 0:
        print(f"embeddings in {out}: {embedded} embedded now in {format_duration(seconds)}", flush=True)
    return out


# ============================================================================================== reading


class Embeddings:
    """Read an embeddings directory: per task queries, local pools, the global pool."""

    def __init__(self, directory: PathLike):
        self.directory = as_path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not an embeddings directory (run tools/embed.py first)")
        self.manifest = json.loads(path.read_text())

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def group(self, name: str) -> tuple[list[str], np.ndarray]:
        """(ids, float16 embeddings [n, D]) of a group, checked complete."""
        directory = self.directory / name
        info_path = directory / GROUP
        if not info_path.is_file():
            raise FileNotFoundError(f"{directory}: not embedded (run tools/embed.py with this task or pool)")
        info = json.loads(info_path.read_text())
        missing = [shard_name(i) for i in range(info["shards"]) if not (directory / shard_name(i)).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory}: {len(missing)} of {info['shards']} shards missing (e.g. {missing[0]}); "
                "the embedding run did not finish: run it again to complete it"
            )
        ids: list[str] = []
        vectors = []
        for i in range(info["shards"]):
            with (directory / shard_name(i)).open("rb") as f, np.load(f, allow_pickle=False) as z:
                ids += z["ids"].tolist()
                vectors.append(z["embeddings"])
        dim = int(self.manifest["dim"])
        out = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float16)
        if len(ids) != info["count"]:
            raise ValueError(f"{directory}: {len(ids)} embeddings, expected {info['count']}")
        return ids, out

    def queries(self, task: str) -> tuple[list[str], np.ndarray]:
        return self.group(f"queries/{task}")

    def local_pool(self, task: str) -> tuple[list[str], np.ndarray]:
        return self.group(f"pools/local/{task}")

    def global_pool(self) -> tuple[list[str], np.ndarray]:
        """The union pool in file order, gathered from the local pools and the extras."""
        members_path = self.directory / "pools" / "global" / MEMBERS
        if not members_path.is_file():
            raise FileNotFoundError(f"{members_path}: the global pool was not embedded (eval.pools)")
        members = json.loads(members_path.read_text())
        index: dict[str, tuple[np.ndarray, int]] = {}
        local_dir = self.directory / "pools" / "local"
        parts = [f"pools/local/{p.name}" for p in sorted(local_dir.iterdir())] if local_dir.is_dir() else []
        for name in [*parts, "pools/global/extra"]:
            ids, vectors = self.group(name)
            for row, did in enumerate(ids):
                index.setdefault(did, (vectors, row))
        missing = [d for d in members if d not in index]
        if missing:
            raise ValueError(f"{members_path}: {len(missing)} members have no embedding (e.g. {missing[0]})")
        out = np.empty((len(members), int(self.manifest["dim"])), np.float16)
        for i, did in enumerate(members):
            vectors, row = index[did]
            out[i] = vectors[row]
        return members, out
