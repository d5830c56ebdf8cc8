"""The backbone registry: Qwen2-VL's spec against transformers, dispatch on config.json's model_type (a
registered stub backbone included), the loader against transformers, and that code outside models/ and
convert/ names no backbone family."""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_qwen2_vl import CASES, RTOL, Shape, hf_forward, make_hf, rel_err  # noqa: E402

from mmret import models  # noqa: E402
from mmret.convert import tables  # noqa: E402
from mmret.convert.checkpoint import convert_from_hf, load_model, read_info  # noqa: E402
from mmret.convert.export import export_to_hf  # noqa: E402
from mmret.convert.hf import ConversionError  # noqa: E402
from mmret.convert.table import ConversionTable, Rule  # noqa: E402
from mmret.data.processor import Processor, ProcessorConfig  # noqa: E402
from mmret.models import qwen2_vl  # noqa: E402
from mmret.models.options import as_dtype  # noqa: E402
from mmret.models.params import count_params, flat_params  # noqa: E402
from mmret.models.qwen2_vl.position_ids import mrope_position_ids  # noqa: E402
from mmret.models.qwen2_vl.processor_files import write_processor_files  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

FAMILY_WORDS = ("qwen2_vl", "Qwen2VL", "qwen2_5_vl", "Qwen2_5_VL", "qwen3_vl", "Qwen3VL")


# --- Qwen2-VL's spec, against transformers -------------------------------------------------------


def test_registry_resolves_qwen2_vl() -> None:
    spec = models.get("qwen2_vl")
    assert "qwen2_vl" in models.names()
    assert spec.model_type == "qwen2_vl" and spec.name == "Qwen2-VL"
    assert spec.config_class is qwen2_vl.Qwen2VLConfig and spec.model_class is qwen2_vl.Qwen2VL
    assert spec.position_ids is mrope_position_ids
    assert models.get("qwen2_vl") is spec  # imported once
    # The transformers class it names is the one transformers registers for the model_type.
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES["qwen2_vl"] == spec.hf_model_class
    assert transformers.CONFIG_MAPPING["qwen2_vl"] is transformers.Qwen2VLConfig


def test_qwen2_vl_tokens_and_patching_are_transformers_defaults(tmp_path: Path) -> None:
    spec = models.get("qwen2_vl")
    hf = transformers.Qwen2VLConfig()
    assert spec.tokens.image_pad.id == hf.image_token_id == 151655
    assert spec.tokens.video_pad.id == hf.video_token_id
    assert (spec.tokens.vision_start.id, spec.tokens.vision_end.id) == (
        hf.vision_start_token_id,
        hf.vision_end_token_id,
    )
    # The strings are those tokens in the tokenizer mmret writes (the released Qwen2-VL ids).
    write_processor_files(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for role, token in dataclasses.asdict(spec.tokens).items():
        assert tok.convert_tokens_to_ids(token["text"]) == token["id"], role
    assert tok.pad_token == spec.tokens.pad.text and tok.eos_token == spec.tokens.eos.text
    # Patching: transformers' Qwen2-VL image processor defaults, but for the pixel cap, which is the released
    # checkpoints' (Qwen/Qwen2-VL-2B-Instruct preprocessor_config.json: max_pixels 12845056; the class: 1003520).
    image_processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    defaults = type(image_processor)()
    p = spec.patching
    assert (p.patch_size, p.temporal_patch_size, p.merge_size) == (
        defaults.patch_size,
        defaults.temporal_patch_size,
        defaults.merge_size,
    )
    np.testing.assert_allclose(p.image_mean, defaults.image_mean)
    np.testing.assert_allclose(p.image_std, defaults.image_std)
    assert (p.min_pixels, p.max_pixels) == (defaults.size["shortest_edge"], 12845056)
    assert p.patch_dim == 1176


@pytest.mark.parametrize("preset", ["tiny", "small", "qwen2vl-2b", "qwen2vl-7b"])
def test_presets_found_through_the_registry(preset: str) -> None:
    spec = models.find_preset(preset)
    assert spec is models.get("qwen2_vl") and preset in spec.presets
    hf = models.preset_config(preset)
    assert hf["model_type"] == spec.model_type
    assert spec.hidden_size(spec.config(hf)) == transformers.Qwen2VLConfig(**hf).text_config.hidden_size
    assert set(spec.test_presets) <= set(spec.presets)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(KeyError) as e:
        models.from_preset("qwen2vl-72b")
    assert str(e.value).startswith("unknown preset 'qwen2vl-72b'; choose one of [") and "'tiny'" in str(e.value)


def test_from_preset_builds_the_preset_with_options() -> None:
    model = models.from_preset("tiny", seed=3, dtype="bfloat16", param_dtype="float32", scan_layers=False)
    cfg = model.cfg
    assert isinstance(model, qwen2_vl.Qwen2VL) and (cfg.dtype, cfg.param_dtype) == (jnp.bfloat16, jnp.float32)
    assert not cfg.scan_layers and cfg.hidden_size == 64
    ref = qwen2_vl.create(
        qwen2_vl.Qwen2VLConfig.from_hf_dict(
            models.preset_config("tiny"), dtype="bfloat16", param_dtype="float32", scan_layers=False
        ),
        seed=3,
    )
    a, b = flat_params(model), flat_params(ref)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    embed = ("language_model", "embed_tokens", "embedding")
    assert not np.array_equal(flat_params(models.from_preset("tiny", seed=4))[embed], a[embed])


def test_option_literals_are_backbone_neutral() -> None:
    from mmret.models import options
    from mmret.models.qwen2_vl import config

    assert config.AttentionImpl is options.AttentionImpl and config.RematPolicy is options.RematPolicy
    assert config.as_dtype is options.as_dtype
    from mmret.models.qwen2_vl import hf
    from mmret.models.vocab import grow_vocab

    assert hf.grow_vocab is grow_vocab and hf.flat_params is flat_params
    assert qwen2_vl.from_hf is models.from_hf and hf.from_hf is models.from_hf


# --- unknown model types -------------------------------------------------------------------------


def _config_dir(path: Path, config: dict[str, Any]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_unknown_model_type_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(models.UnknownBackboneError, match=r"^unsupported architecture: model_type='llava'; known") as e:
        models.get("llava")
    assert "'qwen2_vl'" in str(e.value)
    llava = _config_dir(tmp_path / "llava", {"model_type": "llava"})
    with pytest.raises(models.UnknownBackboneError, match=rf"^{llava / 'config.json'}: .*'llava'.*'qwen2_vl'"):
        models.backbone_of(llava)
    with pytest.raises(
        models.UnknownBackboneError,
        match="names no model_type; known model types: 'qwen2_5_vl', 'qwen2_vl', 'qwen3_vl'$",
    ):
        models.backbone_of(_config_dir(tmp_path / "none", {"hidden_size": 8}))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.backbone_of(tmp_path)
    write_processor_files(llava)
    with pytest.raises(models.UnknownBackboneError, match="model_type='llava'"):
        Processor(llava)


def test_from_hf_on_an_unknown_model_type_is_a_conversion_error(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    d = _config_dir(tmp_path / "llava", {"model_type": "llava"})
    save_file({"x": np.zeros(2, np.float32)}, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match=rf"^{d / 'config.json'}: unsupported architecture: model_type='llava'"):
        models.from_hf(d)


# --- from_hf against transformers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A random transformers Qwen2-VL (untied head, GQA) saved by ``save_pretrained``."""
    return make_hf(
        Shape("registry", heads=4, kv_heads=2, mrope=(2, 3, 3), tied=False, vision_depth=2), tmp_path_factory
    )


def test_from_hf_dispatches_to_qwen2_vl_and_reads_transformers_weights(hf_pair: tuple[Any, Path]) -> None:
    hf, path = hf_pair
    assert models.backbone_of(path) is models.get("qwen2_vl")
    model = models.from_hf(path, "float32", with_lm_head=True)
    assert isinstance(model, qwen2_vl.Qwen2VL)
    assert count_params(model) == sum(p.numel() for p in hf.parameters())
    ours = {k: np.asarray(v) for k, v in flat_params(model).items()}
    lm, vis = hf.model.language_model, hf.model.visual

    def t(x: torch.Tensor) -> np.ndarray:
        return x.detach().numpy()

    np.testing.assert_array_equal(ours[("language_model", "embed_tokens", "embedding")], t(lm.embed_tokens.weight))
    np.testing.assert_array_equal(ours[("lm_head", "kernel")], t(hf.lm_head.weight).T)
    q = ("language_model", "layers", "layers", "self_attn", "q_proj")
    np.testing.assert_array_equal(ours[(*q, "kernel")][1], t(lm.layers[1].self_attn.q_proj.weight).T)
    np.testing.assert_array_equal(ours[(*q, "bias")][0], t(lm.layers[0].self_attn.q_proj.bias))
    norm = ("language_model", "layers", "layers", "post_attention_layernorm", "scale")
    np.testing.assert_array_equal(ours[norm][1], t(lm.layers[1].post_attention_layernorm.weight))
    np.testing.assert_array_equal(
        ours[("visual", "blocks", "layers", "attn", "qkv", "kernel")][1], t(vis.blocks[1].attn.qkv.weight).T
    )
    conv = t(vis.patch_embed.proj.weight)  # Conv3d [embed, C, T, P, P], kernel == stride
    np.testing.assert_array_equal(ours[("visual", "patch_embed", "proj", "kernel")], conv.reshape(len(conv), -1).T)
    np.testing.assert_array_equal(ours[("visual", "merger", "mlp_2", "kernel")], t(vis.merger.mlp[2].weight).T)
    # The qwen2_vl entry point is the same loader: bitwise the same parameters, unscanned too.
    for scan in (True, False):
        a = flat_params(qwen2_vl.from_hf(path, jnp.float32, with_lm_head=True, scan_layers=scan))
        b = flat_params(models.from_hf(path, jnp.float32, with_lm_head=True, scan_layers=scan))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", ["text_only", "padded_batch"])
def test_from_hf_output_matches_transformers(hf_pair: tuple[Any, Path], case: str) -> None:
    hf, path = hf_pair
    b = CASES[case]
    ref_hidden, ref_logits = hf_forward(hf, b)
    out = models.from_hf(path, "float32", with_lm_head=True)(b.ids, b.mask, b.pixel_values, b.grid)
    assert rel_err(np.asarray(out.last_hidden_state), ref_hidden, b.mask) < RTOL
    assert rel_err(np.asarray(out.logits), ref_logits, b.mask) < RTOL


# --- a registered stub backbone -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StubConfig:
    """The least a backbone config has: an embedding table and the run options."""

    model_type: ClassVar[str] = "stub_vl"
    vocab_size: int = 10
    hidden_size: int = 4
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    scan_layers: bool = False
    with_lm_head: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **options: Any) -> StubConfig:
        assert hf["model_type"] == cls.model_type
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"]).replace(**options)

    def replace(self, **kwargs: Any) -> StubConfig:
        for key in ("dtype", "param_dtype"):
            if key in kwargs:
                kwargs[key] = as_dtype(kwargs[key])
        return dataclasses.replace(self, **kwargs)

    def with_vocab_size(self, vocab_size: int) -> StubConfig:
        return self.replace(vocab_size=vocab_size)


class StubModel(nnx.Module):
    def __init__(self, cfg: StubConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=cfg.param_dtype, rngs=rngs)


CALLS: list[str] = []


def stub_position_ids(input_ids: Any, attention_mask: Any, image_grid_thw: Any, **kw: Any) -> Any:
    CALLS.append("position_ids")
    return mrope_position_ids(input_ids, attention_mask, image_grid_thw, **kw)


STUB_HF = {"model_type": "stub_vl", "vocab_size": 10, "hidden_size": 4}
QWEN = models.get("qwen2_vl")
STUB = models.Backbone(
    model_type="stub_vl",
    name="Stub",
    config_class=StubConfig,
    model_class=StubModel,
    position_ids=stub_position_ids,
    patching=dataclasses.replace(QWEN.patching, min_pixels=28 * 28, max_pixels=4 * 28 * 28),
    tokens=QWEN.tokens,
    presets=("stub-tiny",),
    test_presets=("stub-tiny",),
    preset_config=lambda name: dict(STUB_HF),
    hf_model_class="NoSuchTransformersClass",
    embed_path=("embed", "embedding"),
    lm_head_path=("lm_head", "kernel"),
)
STUB_TABLE = ConversionTable(
    name="Stub",
    rules=(Rule("embed.weight", "embed.embedding"),),
    depth=lambda cfg, hub: 0,
    patch_embed_shape=lambda cfg: (),
    hub_aliases=(("model.embed.", "embed."),),
)


@pytest.fixture
def stub() -> Iterator[models.Backbone]:
    models.register(STUB)
    tables.register("stub_vl", STUB_TABLE)
    CALLS.clear()
    yield STUB
    models.unregister("stub_vl")
    tables.unregister("stub_vl")


def _stub_dir(path: Path, rows: np.ndarray) -> Path:
    from safetensors.numpy import save_file

    _config_dir(path, STUB_HF | {"vocab_size": rows.shape[0]})
    save_file({"model.embed.weight": rows}, str(path / "model.safetensors"))  # the aliased layout
    return path


def test_a_registered_backbone_is_found_by_from_hf(stub: models.Backbone, tmp_path: Path) -> None:
    assert "stub_vl" in models.names() and models.get("stub_vl") is stub
    with pytest.raises(ValueError, match="already registered"):
        models.register(STUB)
    rows = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    d = _stub_dir(tmp_path / "stub", rows)
    assert models.backbone_of(d) is stub
    model = models.from_hf(d)
    assert isinstance(model, StubModel) and model.cfg == StubConfig()
    np.testing.assert_array_equal(np.asarray(model.embed.embedding.get_value()), rows)
    # grow_vocab works from the spec's embedding path.
    grown = models.from_hf(d, min_vocab_size=13, seed=1)
    embed = np.asarray(grown.embed.embedding.get_value())
    assert grown.cfg.vocab_size == 13 and embed.shape == (13, 4)
    np.testing.assert_array_equal(embed[:10], rows)
    np.testing.assert_allclose(embed[10:], np.broadcast_to(rows.mean(0), (3, 4)), atol=1e-3)
    # Presets are found through the registry too.
    assert isinstance(models.from_preset("stub-tiny"), StubModel) and "stub-tiny" in models.presets()


def test_checkpoints_of_a_registered_backbone_round_trip(stub: models.Backbone, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    ckpt = convert_from_hf(_stub_dir(tmp_path / "stub", rows), tmp_path / "ckpt")
    assert read_info(ckpt).backbone is stub and read_info(ckpt).table is STUB_TABLE
    loaded = load_model(ckpt)
    assert isinstance(loaded, StubModel)
    np.testing.assert_array_equal(np.asarray(loaded.embed.embedding.get_value()), rows)
    out = export_to_hf(ckpt, tmp_path / "hf")
    assert load_file(str(out / "model.safetensors")).keys() == {"embed.weight"}  # canonical layout
    np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))["embed.weight"], rows)


def test_processor_takes_its_backbone_from_config_json(stub: models.Backbone, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    write_processor_files(plain)
    assert Processor(plain).backbone is QWEN  # no config.json: the default
    typed = _config_dir(tmp_path / "typed", STUB_HF)
    write_processor_files(typed)
    (typed / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14}))  # no pixel bounds
    proc = Processor(typed, ProcessorConfig(max_pixels=None))
    assert proc.backbone is stub and CALLS == []
    assert (proc.patcher.min_pixels, proc.patcher.max_pixels) == (28 * 28, 4 * 28 * 28)  # the stub's defaults
    ex = proc(text="A dog.", instruction="Find it.")
    assert CALLS == ["position_ids"]
    np.testing.assert_array_equal(ex.position_ids, np.broadcast_to(np.arange(ex.length), (3, ex.length)))
    assert Processor(typed, model_type="qwen2_vl").backbone is QWEN


# --- code outside models/ and convert/ names no backbone family ---------------------------------


def _code_words(path: Path) -> set[str]:
    """Identifiers, attribute and import names and non-docstring string literals of a Python file
    (comments and docstrings, which may cite references such as transformers classes, are left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.alias):
            words.update({node.name, node.asname or ""})
        elif isinstance(node, ast.ImportFrom):
            words.add(node.module or "")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            words.add(node.value)
    return words


def _family_names(path: Path) -> list[str]:
    return sorted(w for w in _code_words(path) if any(f in w for f in FAMILY_WORDS))


def test_the_scan_sees_imports_and_strings(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        '"""Cites Qwen2VLImageProcessor."""\n# qwen2_vl in a comment\n'
        "from mmret.models.qwen2_vl.presets import hf_config\nKIND = 'qwen2_vl'\n"
    )
    assert _family_names(probe) == ["mmret.models.qwen2_vl.presets", "qwen2_vl"]


def test_nothing_outside_models_and_convert_names_qwen2_vl() -> None:
    offenders = {}
    for path in sorted((REPO / "mmret").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(("mmret/models/", "mmret/convert/")):
            continue
        if found := _family_names(path):
            offenders[rel] = found
    assert not offenders, f"use mmret.models (the registry) instead: {offenders}"


def test_models_never_import_convert_at_module_level() -> None:
    offenders = []
    for path in sorted((REPO / "mmret" / "models").rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.startswith("mmret.convert")]
    assert not offenders
