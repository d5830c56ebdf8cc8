"""The device mesh, and shardings from logical axis names (maxtext style).

One mesh with axes ``("data", "fsdp", "tensor")``. Parameters carry logical axis names (see
:mod:`mmret.models.partitioning`); a rules table, kept as data in the config (``sharding.rules``),
maps each logical name to mesh axes. Model code never names a mesh axis.

Rules are ``(logical name, mesh axes)`` pairs; mesh axes is ``None`` (replicated), one axis name, or a
tuple of names (sharded over all of them jointly). A name may appear several times: its entries are
candidates in order of preference. Resolving a spec of logical names (:func:`logical_to_mesh`):

* each dim takes its first *usable* candidate: its mesh axes are not used yet in this spec and, when
  the mesh is known, their size is above 1 and (when the shape is known) divides the dim;
* first choices are settled before fallbacks, and within one rank earlier dims win, so a mesh axis
  is used at most once per spec (a later dim that would reuse it falls back or gets ``None``);
* an explicit ``None`` candidate settles the dim as replicated.

The fallbacks matter for a mesh without tensor parallelism: a bias over ``heads`` then takes
``fsdp`` instead of staying replicated, while a ``heads x embed`` kernel keeps ``fsdp`` on embed.

Typical use (the trainer)::

    mesh = make_mesh(cfg.mesh)                      # {"data": -1, "fsdp": 1, "tensor": 1}
    rules = make_rules(cfg.sharding.rules)
    model = shard_model(lambda: qwen2_vl.create(model_cfg), mesh, rules)
    graphdef, params = nnx.split(model)
    p_sh = param_shardings(params, mesh, rules)
    o_sh = opt_state_shardings(jax.eval_shape(tx.init, params), p_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    batch = put_batch(host_batch, mesh, rules)      # leading dim over data x fsdp
    step = jax.jit(train_step, in_shardings=(p_sh, o_sh, batch_shardings(batch, mesh, rules)), ...)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmret.models import partitioning
from mmret.models.partitioning import LOGICAL_AXES

M = TypeVar("M", bound=nnx.Module)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

#: Logical names of activation dims (constrained with :func:`with_logical_constraint`).
ACTIVATION_AXES: tuple[str, ...] = (
    "batch",  # examples (queries or candidates) of the global batch
    "length",  # sequence positions
    "act_embed",  # LLM width (the residual stream and the pooled embedding)
    "act_heads",  # attention query heads ([B, L, heads, head_dim])
    "act_kv_heads",  # attention key/value heads
    "act_head_dim",
    "act_mlp",  # LLM MLP hidden
    "act_vocab",  # logits
    "vision_tokens",  # patch rows of pixel_values / the vision tower ([patches, ...])
    "act_vision_embed",
    "act_vision_heads",
    "act_vision_mlp",
    "candidates",  # the candidate axis of a query x candidate score matrix (every query sees all)
)

#: Every logical name a rule may map.
KNOWN_AXES: tuple[str, ...] = LOGICAL_AXES + ACTIVATION_AXES

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

#: The default table. fsdp shards the model width of every parameter ("embed", "vision_embed" and the
#: norms: FSDP stores everything sharded and gathers it at use); tensor shards the inner dims of the
#: Megatron layout (heads, MLP hidden, vocab), with fsdp as their fallback so that biases over those
#: dims are sharded on meshes without tensor parallelism; stacked layers are never sharded (the scan
#: walks them). Activations: the batch over data x fsdp, inner dims over tensor, the rest replicated.
DEFAULT_RULES: Rules = (
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("heads", "fsdp"),
    ("kv_heads", "tensor"),
    ("kv_heads", "fsdp"),
    ("mlp", "tensor"),
    ("mlp", "fsdp"),
    ("norm", "fsdp"),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_heads", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_mlp", "fsdp"),
    ("vision_patch", None),
    ("vision_positions", None),
    ("merger_mlp", "tensor"),
    ("merger_mlp", "fsdp"),
    ("lora_rank", None),  # LoRA adapters: small; their other dim follows the layer they adapt
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vision_tokens", ("data", "fsdp")),
    ("act_vision_embed", None),
    ("act_vision_heads", "tensor"),
    ("act_vision_mlp", "tensor"),
    ("candidates", None),
)

#: Leaves of a batch whose batch dim is not the first (``position_ids`` is [3, B, L]).
BATCH_AXES: dict[str, int] = {"position_ids": 1}


# Mesh --------------------------------------------------------------------------------------------


def _mesh_sizes(shape: Any) -> dict[str, int]:
    if hasattr(shape, "items"):  # dict, ml_collections.ConfigDict
        given = dict(shape.items())
        for key in given:
            if key not in MESH_AXES:
                raise ValueError(f"mesh.{key}: unknown mesh axis; the axes are {MESH_AXES}")
    elif isinstance(shape, Sequence) and not isinstance(shape, str):
        if len(shape) != len(MESH_AXES):
            raise ValueError(f"mesh shape {tuple(shape)} must give {len(MESH_AXES)} sizes, for {MESH_AXES}")
        given = dict(zip(MESH_AXES, shape, strict=True))
    else:
        raise TypeError(f"mesh shape must be a mapping {{axis: size}} or a sequence of sizes, got {shape!r}")
    sizes = {}
    for axis in MESH_AXES:
        size = given.get(axis, 1)
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise ValueError(f"mesh.{axis}={size!r}: a size must be an int (-1 for the rest)")
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{axis}={size}: a size must be positive, or -1 for the rest")
        sizes[axis] = int(size)
    return sizes


def mesh_shape(shape: Mapping[str, int] | Sequence[int] | Any, num_devices: int) -> tuple[int, int, int]:
    """Resolve a mesh shape (``-1`` = the rest of the devices) against ``num_devices``."""
    sizes = _mesh_sizes(shape)
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {', '.join(f'mesh.{a}=-1' for a in rest)}")
    known = math.prod(s for s in sizes.values() if s != -1)
    desc = " * ".join(f"mesh.{a}={s}" for a, s in sizes.items() if s != -1)
    if rest:
        if num_devices % known:
            raise ValueError(f"mesh: {desc} = {known} does not divide the {num_devices} devices (mesh.{rest[0]}=-1)")
        sizes[rest[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh: {desc} = {known}, but there are {num_devices} devices; "
            "make the product equal the device count or set one axis to -1"
        )
    return tuple(sizes[a] for a in MESH_AXES)  # type: ignore[return-value]


def make_mesh(shape: Mapping[str, int] | Sequence[int] | Any, devices: Sequence[Any] | None = None) -> Mesh:
    """The ``("data", "fsdp", "tensor")`` mesh, e.g. ``make_mesh({"data": -1, "fsdp": 2, "tensor": 1})``.

    ``-1`` takes the rest of the devices (at most one axis); missing axes are 1. Devices are laid out
    by :func:`jax.make_mesh` (topology-aware on TPU; on GPU, process-major so the inner axes stay
    within a host); devices spanning several TPU slices get a hybrid mesh with ``data`` across slices.
    Axes are ``Auto`` (GSPMD propagates shardings between the constraints)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(shape, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len({getattr(d, "slice_index", 0) or 0 for d in devices}) > 1:
        return Mesh(hybrid_device_grid(sizes, devices), MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)


def hybrid_device_grid(sizes: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    """Devices of several slices (multi-slice TPU) as a ``sizes`` grid: ``data`` is split across the
    slices (only data parallelism crosses the slow network), fsdp and tensor stay within a slice."""
    n = len({getattr(d, "slice_index", 0) or 0 for d in devices})
    if sizes[0] % n:
        raise ValueError(f"mesh.data={sizes[0]} must be a multiple of the {n} slices (data parallelism spans slices)")
    ici = (sizes[0] // n, *sizes[1:])
    return mesh_utils.create_hybrid_device_mesh(ici, (n,) + (1,) * (len(sizes) - 1), devices)


# Rules -------------------------------------------------------------------------------------------


def _as_axes(key: str, value: Any) -> MeshAxes:
    """Validate one rule's mesh axes; lists become tuples (config files may write either)."""
    where = f"sharding.rules[{key!r}]"
    if value is None:
        return None
    if isinstance(value, str):
        names: tuple[str, ...] = (value,)
    elif isinstance(value, Sequence):
        names = tuple(value)
    else:
        raise ValueError(f"{where}: mesh axes must be None, an axis name or a tuple of names, got {value!r}")
    for name in names:
        if name not in MESH_AXES:
            raise ValueError(f"{where}: unknown mesh axis {name!r}; the mesh axes are {MESH_AXES}")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: mesh axis repeated in {names}")
    if not names:
        return None
    return names[0] if isinstance(value, str) else names


def make_rules(rules: Any = None, overrides: Any = None) -> Rules:
    """A validated rules table: ``rules`` (pairs, or a mapping with one entry per name; default
    :data:`DEFAULT_RULES`), then ``overrides`` replacing every entry of the names they give.
    Raises ``ValueError`` naming an unknown logical name or mesh axis."""

    def pairs(table: Any) -> list[tuple[str, MeshAxes]]:
        items = table.items() if hasattr(table, "items") else table
        out = []
        for item in items:
            if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2:
                raise ValueError(f"sharding.rules: each rule is a (logical name, mesh axes) pair, got {item!r}")
            key, value = item
            if key not in KNOWN_AXES:
                raise ValueError(f"sharding.rules: unknown logical axis {key!r}; known: {KNOWN_AXES}")
            out.append((key, _as_axes(key, value)))
        return out

    table = pairs(DEFAULT_RULES if rules is None else rules)
    if overrides is not None:
        extra = pairs(overrides)
        replaced = {k for k, _ in extra}
        table = [r for r in table if r[0] not in replaced] + extra
    return tuple(table)


def _candidates(rules: Rules) -> dict[str, list[tuple[str, ...]]]:
    table: dict[str, list[tuple[str, ...]]] = {}
    for key, value in rules:
        table.setdefault(key, []).append(() if value is None else (value,) if isinstance(value, str) else value)
    return table


@functools.lru_cache(maxsize=64)
def _cached_table(rules: tuple[Any, ...]) -> dict[str, list[tuple[str, ...]]]:
    return _candidates(make_rules(rules))


def _table(rules: Any) -> dict[str, list[tuple[str, ...]]]:
    """Each logical name's candidate mesh axes, validated (cached for hashable tables)."""
    rules = current_rules() if rules is None else rules
    try:
        return _cached_table(rules) if isinstance(rules, tuple) else _candidates(make_rules(rules))
    except TypeError:  # unhashable entries (lists)
        return _candidates(make_rules(rules))


_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("mmret_sharding_rules", default=None)


@contextlib.contextmanager
def axis_rules(rules: Any) -> Iterator[Rules]:
    """Make ``rules`` the default of :func:`with_logical_constraint` (and the others) within the block, and
    install them as the models' activation layout (:func:`mmret.models.partitioning.constrain`, on the mesh
    of ``jax.set_mesh``). A jitted function traced under one table keeps it: retrace (a new jit) after
    changing tables."""
    table = make_rules(rules)
    token = _RULES.set(table)
    try:
        with partitioning.activation_layout(_Layout(table)):
            yield table
    finally:
        _RULES.reset(token)


class _Layout:
    """The models' activation layout under one rules table, on the mesh set by ``jax.set_mesh``."""

    def __init__(self, rules: Rules):
        self.rules = rules

    def constrain(self, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
        return with_logical_constraint(x, names, self.rules)

    def shards(self, name: str) -> int:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return 1
        (axes,) = logical_to_mesh((name,), self.rules, mesh=mesh)
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        return math.prod(_axis_size(mesh, a) for a in axes)


def current_rules() -> Rules:
    """The rules set by :func:`axis_rules`, else :data:`DEFAULT_RULES`."""
    rules = _RULES.get()
    return DEFAULT_RULES if rules is None else rules


def _axis_size(mesh: Any, axis: str) -> int:
    return int(dict(mesh.shape).get(axis, 1))


def logical_to_mesh(
    spec: Sequence[str | None] | P,
    rules: Any = None,
    mesh: Mesh | Any | None = None,
    shape: Sequence[int] | None = None,
) -> P:
    """The mesh ``PartitionSpec`` of a spec of logical names (see the module docstring for the rule).
    With ``mesh`` (a ``Mesh`` or ``AbstractMesh``) candidates of size 1, or (with ``shape``) that do
    not divide the dim, are skipped."""
    names = tuple(spec)
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical spec {names} has {len(names)} names for a shape of rank {len(shape)}")
    for name in names:
        if name is not None and (not isinstance(name, str) or name not in KNOWN_AXES):
            raise ValueError(f"unknown logical axis {name!r} in {names}; known: {KNOWN_AXES}")
    table = _table(rules)
    out: list[MeshAxes] = [None] * len(names)
    settled = [name is None for name in names]
    used: set[str] = set()
    depth = max((len(table.get(n, ())) for n in names if n is not None), default=0)
    for rank in range(depth):
        for i, name in enumerate(names):
            cands = table.get(name, []) if name is not None else []
            if settled[i] or rank >= len(cands):
                continue
            axes = cands[rank]
            if not axes:
                settled[i] = True
                continue
            if used.intersection(axes):
                continue
            if mesh is not None:
                size = math.prod(_axis_size(mesh, a) for a in axes)
                if size == 1 or (shape is not None and shape[i] % size):
                    continue
            out[i] = axes[0] if len(axes) == 1 else axes
            used.update(axes)
            settled[i] = True
    return P(*out)


# Parameters and optimiser state ------------------------------------------------------------------


def _logical_names(var: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = var.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key):
            return tuple(meta[key])
    return None


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(_key_name(k) for k in path)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _state(model_or_state: Any) -> Any:
    return nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state


def param_shardings(model_or_state: nnx.Module | Any, mesh: Mesh, rules: Any = None) -> Any:
    """``NamedSharding`` of every variable of a model (concrete or from :func:`nnx.eval_shape`) or of
    its ``nnx.State``, in the state's structure (``nnx.Variable`` nodes holding shardings), from the
    logical names the variables carry. Variables without names (and scalars) are replicated."""
    rules = current_rules() if rules is None else make_rules(rules)

    def one(path: tuple[Any, ...], x: Any) -> Any:
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            names = _logical_names(x)
            if names is None or not hasattr(value, "shape"):
                return x.replace(NamedSharding(mesh, P()))
            try:
                spec = logical_to_mesh(names, rules, mesh=mesh, shape=value.shape)
            except ValueError as e:
                raise ValueError(f"parameter {_path_str(path)}: {e}") from e
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, _state(model_or_state), is_leaf=lambda x: isinstance(x, nnx.Variable))


def _is_sharding(x: Any) -> bool:
    return isinstance(x, jax.sharding.Sharding)


def _norm_path(path: tuple[Any, ...]) -> tuple[str, ...]:
    names = tuple(_key_name(k) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


def _fits(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
    spec = tuple(sharding.spec)
    if len(spec) > len(shape):
        return False
    for dim, axes in zip(shape, spec, strict=False):
        if axes is not None:
            size = math.prod(_axis_size(sharding.mesh, a) for a in ((axes,) if isinstance(axes, str) else axes))
            if dim % size:
                return False
    return True


def opt_state_shardings(abstract_opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state (e.g. ``jax.eval_shape(tx.init, params)``): a leaf whose tree path
    ends with a parameter's path (``mu``/``nu`` of Adam, ...) takes that parameter's sharding when it
    fits the leaf's shape; everything else (step counts, factored moments) is replicated."""
    table = {
        _norm_path(path): s
        for path, s in jax.tree_util.tree_flatten_with_path(param_shardings, is_leaf=_is_sharding)[0]
        if _is_sharding(s)
    }
    replicated = NamedSharding(mesh, P())

    def one(path: tuple[Any, ...], leaf: Any) -> Any:
        shape = tuple(getattr(leaf, "shape", ()))
        if not shape:
            return replicated
        names = _norm_path(path)
        for start in range(len(names)):
            s = table.get(names[start:])
            if s is not None:
                return s if _fits(s, shape) else replicated
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def unsharded_params(model_or_state: nnx.Module | Any, shardings: Any, min_size: int = 2**14) -> list[str]:
    """Paths of the variables with more than ``min_size`` elements that ``shardings`` (from
    :func:`param_shardings`) leaves fully replicated (no mesh axis of size > 1): worth a warning."""
    values = jax.tree_util.tree_flatten_with_path(_state(model_or_state))[0]
    shards = jax.tree.leaves(shardings, is_leaf=_is_sharding)
    if len(values) != len(shards):
        raise ValueError(f"{len(values)} variables but {len(shards)} shardings")
    out = []
    for (path, value), s in zip(values, shards, strict=True):
        if int(np.prod(getattr(value, "shape", ()))) > min_size and s.is_fully_replicated:
            out.append(_path_str(_norm_path(path)))
    return out


def shard_model(create_fn: Callable[[], M], mesh: Mesh, rules: Any = None) -> M:
    """Create a model directly sharded: ``nnx.eval_shape`` first (nothing materialised), then
    ``create_fn`` runs inside ``jax.jit`` with the rules' shardings as ``out_shardings``. The values
    equal an unsharded ``create_fn()`` (partitionable random numbers)."""
    abstract = nnx.eval_shape(create_fn)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh, rules)

    init = jax.jit(lambda: nnx.split(create_fn())[1], out_shardings=shardings)
    return nnx.merge(graphdef, init())


def sharded_abstract(model_or_state: nnx.Module | Any, mesh: Mesh, rules: Any = None) -> Any:
    """The state as ``jax.ShapeDtypeStruct`` s carrying their shardings: a restore target (orbax)
    that reads a checkpoint straight into the sharded layout."""
    state = _state(model_or_state)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state,
        param_shardings(state, mesh, rules),
    )


def place_model(model: M, mesh: Mesh, rules: Any = None) -> M:
    """Move an existing (e.g. loaded) model's variables onto ``mesh`` per the rules, in place."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


# Batches and activations -------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, ndim: int = 1, axis: int = 0, rules: Any = None) -> NamedSharding:
    """Dim ``axis`` of an ``ndim``-array over the mesh axes of the logical ``"batch"`` (data x fsdp
    by default), the other dims replicated. ``position_ids`` [3, B, L] takes ``axis=1``."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"batch axis {axis} out of range for an array of rank {ndim}")
    names: list[str | None] = [None] * ndim
    names[axis % ndim] = "batch"
    return NamedSharding(mesh, logical_to_mesh(names, rules, mesh=mesh))


def _batch_size(mesh: Mesh, rules: Any) -> int:
    spec = logical_to_mesh(("batch",), rules, mesh=mesh)
    axes = spec[0]
    if axes is None:
        return 1
    return math.prod(_axis_size(mesh, a) for a in ((axes,) if isinstance(axes, str) else axes))


def batch_shardings(batch: Any, mesh: Mesh, rules: Any = None, batch_axes: Mapping[str, int] | None = None) -> Any:
    """A sharding per array of a (nested) batch: the batch dim (``batch_axes[leaf name]``, default
    :data:`BATCH_AXES`, else 0) over the ``"batch"`` mesh axes; scalars replicated. Raises
    ``ValueError`` naming a leaf whose batch dim the batch mesh axes do not divide, and ``TypeError``
    for a non-array leaf (drop host-only entries such as ``meta`` first)."""
    axes_by_name = BATCH_AXES if batch_axes is None else batch_axes
    n = _batch_size(mesh, rules)

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        where = _path_str(path)
        shape = getattr(leaf, "shape", None)
        if shape is None:
            raise TypeError(f"batch leaf {where} is not an array ({type(leaf).__name__}); drop host-only entries")
        if len(shape) == 0:
            return NamedSharding(mesh, P())
        axis = axes_by_name.get(_key_name(path[-1]) if path else "", 0)
        if shape[axis] % n:
            raise ValueError(
                f"batch leaf {where}: dim {axis} has size {shape[axis]}, not divisible by the {n} batch shards "
                f"(mesh data x fsdp); pad the batch or change the mesh"
            )
        return batch_sharding(mesh, len(shape), axis, rules)

    return jax.tree_util.tree_map_with_path(one, batch)


def global_shapes(batch: Any, processes: int, batch_axes: Mapping[str, int] | None = None) -> Any:
    """``jax.ShapeDtypeStruct`` s of the global batch whose per-process parts are ``batch`` (arrays or shapes):
    each leaf's batch dim (``batch_axes``, default :data:`BATCH_AXES`, else 0) times ``processes``."""
    axes_by_name = BATCH_AXES if batch_axes is None else batch_axes

    def one(path: tuple[Any, ...], x: Any) -> jax.ShapeDtypeStruct:
        shape = list(np.shape(x))
        if shape:
            shape[axes_by_name.get(_key_name(path[-1]) if path else "", 0)] *= processes
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)

    return jax.tree_util.tree_map_with_path(one, batch)


def put_batch(batch: Any, mesh: Mesh, rules: Any = None, batch_axes: Mapping[str, int] | None = None) -> Any:
    """Global ``jax.Array`` s from this process's part of the batch (numpy), sharded per
    :func:`batch_shardings`; on several hosts the parts are concatenated along the batch dims in
    process order (``jax.make_array_from_process_local_data``)."""
    shardings = batch_shardings(global_shapes(batch, jax.process_count(), batch_axes), mesh, rules, batch_axes)
    return jax.tree.map(
        lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x)), shardings, batch, is_leaf=_is_sharding
    )


def with_logical_constraint(
    x: jax.Array, logical_names: Sequence[str | None], rules: Any = None, mesh: Mesh | None = None
) -> jax.Array:
    """``jax.lax.with_sharding_constraint`` from logical names. ``mesh`` defaults to the mesh set by
    ``jax.set_mesh``, ``rules`` to :func:`current_rules`; without a mesh it returns ``x`` unchanged
    (model code runs the same unsharded)."""
    if mesh is None:
        abstract = jax.sharding.get_abstract_mesh()
        if abstract.empty:
            return x
        mesh = abstract
    spec = logical_to_mesh(tuple(logical_names), rules, mesh=mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
