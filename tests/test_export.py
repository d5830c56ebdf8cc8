"""Export of a run (mmret.export) against transformers itself: the exported directory loads in the backbone's
transformers class with no missing or unexpected keys, and a short reference written here from
``mmret_embedding.json`` alone (transformers' tokenizer, chat template, image processor and model; torch)
embeds text-only, image-only and image+text inputs as mmret does; an untied head, added tokens and a
reranker's P(yes) carry over too."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import eval_trainer_config, load_tool, uniir_format_string
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmret.build import pair_renderer, processor_dir  # noqa: E402
from mmret.checkpoints import load_trained, load_trained_reranker  # noqa: E402
from mmret.convert.hf import SafetensorsCheckpoint  # noqa: E402
from mmret.data.processor import Processor  # noqa: E402
from mmret.data.rerank_pairs import collate_pairs  # noqa: E402
from mmret.export import export_run  # noqa: E402
from mmret.optim import OptimizerConfig  # noqa: E402
from mmret.recipe import CheckpointConfig, LoRAConfig, ModelConfig, config_to_json  # noqa: E402

make_tiny = load_tool("make_tiny_model")
export_tool = load_tool("export_run")
HF_CLASS = transformers.Qwen2VLForConditionalGeneration
BASE_VOCAB = 151657  # the Qwen2 tokenizer's size: U-MARVEL's three added tokens need new rows


def _config(data_root: Path, model_dir: Path, **changes):
    cfg = eval_trainer_config(data_root, model_dir, ["mscoco_task0"])
    return dataclasses.replace(
        cfg,
        model=ModelConfig(hf_dir=str(model_dir)),
        data=dataclasses.replace(cfg.data, processor_dir=None),
        **changes,
    )


def _unrun(cfg, workdir: Path) -> Path:
    """A run directory that holds only its config (exported at step 0: the model it would start from)."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(config_to_json(cfg)))
    return workdir


@pytest.fixture(scope="module")
def trained(tiny_mbeir, tmp_path_factory):
    """The tiny Qwen2-VL (tied head) trained 2 steps with LoRA (a large learning rate, so the merge matters),
    evaluated at step 2, exported."""
    from mmret.eval.run import evaluate_run
    from mmret.train.trainer import train

    base = tmp_path_factory.mktemp("export")
    model_dir = make_tiny.write_model_dir(base / "tiny")
    cfg = _config(
        tiny_mbeir,
        model_dir,
        lora=LoRAConfig(rank=4, alpha=8.0),
        total_steps=2,
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0),
        checkpoint=CheckpointConfig(every=2, keep=1),
        log_every=1,
    )
    workdir = base / "run"
    train(cfg, workdir)
    evaluate_run(cfg, workdir, 2)
    out = export_run(workdir, base / "export")
    return SimpleNamespace(cfg=cfg, workdir=workdir, out=out, model_dir=model_dir)


@pytest.fixture(scope="module")
def hf_export(trained):
    model, info = HF_CLASS.from_pretrained(trained.out, output_loading_info=True)
    return SimpleNamespace(
        model=model.eval(),
        info=info,
        tokenizer=transformers.AutoTokenizer.from_pretrained(trained.out),
        image_processor=transformers.AutoImageProcessor.from_pretrained(trained.out),
        spec=json.loads((trained.out / "mmret_embedding.json").read_text()),
    )


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


# --- the reference: transformers and mmret_embedding.json only ------------------------------------------


def reference_embedding(hf, *, instruction: str | None, text: str | None, image: Image.Image | None) -> np.ndarray:
    """The embedding as mmret_embedding.json describes it, through transformers' own pieces."""
    spec, t = hf.spec, hf.spec["template"]
    assert spec["pooling"] == "mean" and spec["pool_scope"] == "sequence" and spec["fusion"] == "joint"
    user = ""
    if instruction:
        user += t["instruction_start"] + instruction + t["instruction_end"]
    if text:
        user += (" " + text) if instruction else text
    words = {(True, True): "image and sentence", (True, False): "image", (False, True): "sentence"}
    user += t["summary_suffix"].format(modality=words[(image is not None, bool(text))])
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": user}]
    messages = [{"role": "user", "content": content}]
    prompt = hf.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith(f"<|im_start|>system\n{t['system_prompt']}<|im_end|>")  # the chat template's own
    prompt += t["embed_token"]
    kw = {}
    if image is not None:
        px = hf.image_processor(images=[image], return_tensors="pt")
        merge = hf.image_processor.merge_size
        prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * (int(px["image_grid_thw"].prod()) // merge**2))
        kw = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
    ids = torch.tensor([hf.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    image_id = hf.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    kw["mm_token_type_ids"] = (ids == image_id).long()
    positions, _ = hf.model.model.get_rope_index(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    length = ids.shape[1]
    mask = torch.ones(1, 1, length, length, dtype=torch.bool)  # bidirectional: nothing masked
    assert spec["attention"] == "bidirectional"
    with torch.no_grad():
        out = hf.model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, **kw)
    hidden = out.hidden_states[-1][0].numpy()
    ids = ids[0].numpy()
    start, end = (hf.tokenizer.convert_tokens_to_ids(t[k]) for k in ("instruction_start", "instruction_end"))
    pooled = np.ones(len(ids), bool)  # every token but the instruction and its markers
    if instruction:
        a, b = int(np.flatnonzero(ids == start)[0]), int(np.flatnonzero(ids == end)[0])
        pooled[a : b + 1] = False
    emb = hidden[pooled].mean(axis=0)
    return emb / np.linalg.norm(emb) if spec["normalize"] else emb


def mmret_embedding(trained, *, instruction, text, image) -> np.ndarray:
    model = load_trained(trained.cfg, trained.workdir, 2)
    proc = Processor(processor_dir(trained.cfg), trained.cfg.data.processor)
    ex = proc(text=text, image=image, instruction=instruction, for_eval=True)
    batch = proc.collate([ex], max_length=ex.length, max_patches=max(ex.num_patches, 8))
    return np.asarray(model.encoder(batch))[0]


# --- tests ------------------------------------------------------------------------------------------


def test_export_loads_in_transformers_with_no_missing_or_unexpected_keys(hf_export, trained):
    assert {k: v for k, v in hf_export.info.items() if v} == {}
    files = {p.name for p in trained.out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"} <= files
    assert {"mmret_embedding.json", "README.md"} <= files


def test_lora_is_merged_into_the_exported_weights(trained):
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    source = SafetensorsCheckpoint(trained.model_dir)
    exported = SafetensorsCheckpoint(trained.out)
    src_key = next(k for k in source.keys() if k.endswith("layers.0.self_attn.q_proj.weight"))
    out_key = next(k for k in exported.keys() if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert key.endswith(out_key.split("model.", 1)[-1])
    moved = np.abs(exported.get(out_key) - source.get(src_key)).max()
    assert moved > 1e-4  # the trained adapters are in the plain weight


@pytest.mark.parametrize(
    "inputs",
    [
        dict(instruction="Find the caption of this image.", text=None, image=(70, 50, 1)),  # image-only query
        dict(instruction="Retrieve a matching image.", text="A red square on a table.", image=None),  # text query
        dict(instruction=None, text="A red square on a table.", image=(64, 90, 2)),  # image+text candidate
        dict(instruction=None, text=None, image=(90, 64, 3)),  # image-only candidate
    ],
    ids=["query_image", "query_text", "candidate_image_text", "candidate_image"],
)
def test_exported_embeddings_equal_mmret(hf_export, trained, inputs):
    image = _image(*inputs["image"]) if inputs["image"] else None
    kw = dict(instruction=inputs["instruction"], text=inputs["text"], image=image)
    ref, ours = reference_embedding(hf_export, **kw), mmret_embedding(trained, **kw)
    assert np.abs(ref - ours).max() < 1e-4, np.abs(ref - ours).max()


def test_exported_image_processor_resizes_as_the_run(hf_export, trained):
    """The run's max_pixels (64 * 28 * 28) reach preprocessor_config.json: a large image gets the same patches."""
    image = _image(400, 300, 4)
    proc = Processor(processor_dir(trained.cfg), trained.cfg.data.processor)
    ours, grid = proc.patcher(image)
    theirs = hf_export.image_processor(images=[image], return_tensors="np")
    np.testing.assert_array_equal(theirs["image_grid_thw"][0], grid[0])
    assert int(np.prod(grid)) <= 64 * 4  # the bound applied (the file's own default would allow far more)
    np.testing.assert_allclose(theirs["pixel_values"], ours, atol=1e-6)
    assert hf_export.spec["processor"]["max_pixels"] == 64 * 28 * 28


def test_embedding_json_and_model_card_describe_the_run(hf_export, trained):
    spec = hf_export.spec
    model = load_trained(trained.cfg, trained.workdir, 2)
    assert spec["temperature"] == pytest.approx(float(model.temperature()), rel=1e-6)
    # The instruction table: the synthetic corpus's row for mscoco task 0 (dataset 9, text -> image).
    rows = (Path(trained.cfg.data.root) / "instructions" / "query_instructions.tsv").read_text().splitlines()[1:]
    cols = next(r.split("\t") for r in rows if r.split("\t")[:2] == ["text", "image"] and r.split("\t")[3] == "9")
    assert spec["instructions"]["mscoco_task0"] == [c for c in cols[4:] if c]
    card = (trained.out / "README.md").read_text()
    report = (trained.workdir / "eval" / "2" / "local" / "report.md").read_text().strip()
    assert report in card and "Qwen2VLForConditionalGeneration" in card and "step 2" in card


def test_export_to_an_object_store_writes_the_same_files(trained, bucket):
    """``export_run`` into ``gs://`` (conftest's fake bucket, where a local-only write fails): every file the
    local export wrote, byte for byte."""
    out = export_run(trained.workdir, "gs://bucket/export")
    assert str(out) == "gs://bucket/export"
    local = sorted(p.name for p in trained.out.iterdir())
    assert sorted(os.listdir(bucket / "export")) == local and "model.safetensors" in local
    for name in local:
        assert (bucket / "export" / name).read_bytes() == (trained.out / name).read_bytes(), name


def test_untied_head_and_added_tokens_carry_over(tiny_mbeir, tmp_path):
    """An untied source (as the 7B) with U-MARVEL's added tokens: the head comes from the source, its new rows
    zero; the tokenizer has the tokens at mmret's ids; transformers' hidden states equal mmret's."""
    model_dir = make_tiny.write_model_dir(tmp_path / "tiny_untied", untied=True, vocab_size=BASE_VOCAB)
    cfg = _config(tiny_mbeir, model_dir)
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, processor=dataclasses.replace(cfg.data.processor, template="umarvel_exact")),
    )
    out = export_run(_unrun(cfg, tmp_path / "run"), tmp_path / "export", step=0)
    hf, info = HF_CLASS.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert hf.config.tie_word_embeddings is False
    source = SafetensorsCheckpoint(model_dir).get("lm_head.weight")
    head = hf.lm_head.weight.detach().numpy()
    assert head.shape[0] == source.shape[0] + 3
    np.testing.assert_array_equal(head[: source.shape[0]], source)
    assert not head[source.shape[0] :].any()
    proc = Processor(processor_dir(cfg), cfg.data.processor)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for token in ("<emb>", "<instruction_start>", "<instruction_end>"):
        assert tok.convert_tokens_to_ids(token) == proc.token_id(token) >= source.shape[0]
    ex = proc(text="A dog.", instruction="Find the image.", for_eval=True)
    assert tok(proc.decode(ex.input_ids), add_special_tokens=False)["input_ids"] == ex.input_ids.tolist()
    ours = load_trained(cfg, None, 0).encoder.backbone
    ids = ex.input_ids[None]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), output_hidden_states=True).hidden_states[-1].numpy()
    got = np.asarray(ours(ids, np.ones_like(ids)).last_hidden_state)
    assert np.abs(ref - got).max() < 1e-4


def test_reranker_export_gives_the_same_yes_probability(tiny_mbeir, tmp_path):
    model_dir = make_tiny.write_model_dir(tmp_path / "tiny", seed=3)
    cfg = _config(tiny_mbeir, model_dir, task="reranker")
    out = export_run(_unrun(cfg, tmp_path / "run"), tmp_path / "export", step=0)
    meta = json.loads((out / "mmret_reranker.json").read_text())
    assert "mmret_embedding.json" not in {p.name for p in out.iterdir()}
    hf = HF_CLASS.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    p = meta["prompt"]
    query, candidate = "Find an image of a dog.", "A dog runs on the beach."
    user = p["instruction"] + p["query_label"] + query + p["candidate_label"] + candidate
    prompt = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = hf(input_ids=ids).logits[0, -1]
    yes, no = tok.convert_tokens_to_ids(p["yes"]), tok.convert_tokens_to_ids(p["no"])
    assert (yes, no) == (meta["yes_token_id"], meta["no_token_id"])
    ref = torch.softmax(logits[[yes, no]], dim=0)[0].item()
    proc = Processor(processor_dir(cfg), cfg.data.processor)
    pairs = pair_renderer(proc, cfg.rerank)
    example = pairs(query, None, candidate, None)
    assert example.example.input_ids.tolist() == ids[0].tolist()
    batch = collate_pairs(
        [example],
        max_length=example.example.length,
        max_patches=8,
        pad_token_id=proc.pad_token_id,
        patch_dim=proc.patcher.patch_dim,
    )
    got = float(np.asarray(load_trained_reranker(cfg, None, 0).score(batch, yes, no))[0])
    assert abs(got - ref) < 1e-4


def test_tool_exports_in_bfloat16_and_reports_bad_input(trained, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert (
        export_tool.main(["--workdir", str(trained.workdir), "--out", str(out), "--dtype", "bfloat16", "--quiet"]) == 0
    )
    ckpt = SafetensorsCheckpoint(out)
    assert {d.name for d in ckpt.dtypes()} == {"bfloat16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert export_tool.main(["--workdir", str(trained.workdir), "--out", str(out), "--quiet"]) == 2
    assert str(out) in capsys.readouterr().err
    assert export_tool.main(["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "config.json: no such file" in capsys.readouterr().err
    assert export_tool.main(["--workdir", str(trained.workdir), "--out", str(tmp_path / "y"), "--step", "7"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


# --- the encode API ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(trained):
    import mmret

    return mmret.Retriever.from_pretrained(trained.out)


def test_api_on_the_export_equals_the_runs_evaluation_embeddings(api, trained):
    """mmret.Retriever over the exported directory embeds the test queries and the local pool of mscoco_task0
    as the run's own evaluation did (its stored float16 embeddings); ten of each: two batches, one padded."""
    from mmret.data.mbeir import read_instructions, read_local_pool, read_queries
    from mmret.eval.embed import Embeddings

    root = Path(trained.cfg.data.root)
    stored = Embeddings(trained.workdir / "eval" / "2" / "embeddings")
    dids, pool_emb = stored.local_pool("mscoco_task0")
    pool = read_local_pool(root, "mscoco_task0")
    chosen = list(range(min(10, len(dids))))
    items = []
    for i in chosen:
        c = pool[dids[i]]
        items.append({"text": c.text, "image": None if c.image_path is None else root / c.image_path})
    got = api.encode_candidates(items)
    assert got.shape == (len(chosen), api.dim) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert np.abs(got - pool_emb[chosen].astype(np.float32)).max() < 2e-3  # float16 storage
    qids, query_emb = stored.queries("mscoco_task0")
    queries = {q.qid: q for q in read_queries(root, "test", "mscoco_task0", pool=pool, eval_positives=True)}
    instructions = read_instructions(root)
    picked = [queries[q] for q in qids[:10]]
    asked = [{"text": q.text, "instruction": instructions.for_query(q, 0)} for q in picked]
    got = api.encode_queries(asked)
    assert np.abs(got - query_emb[: len(picked)].astype(np.float32)).max() < 2e-3


def test_api_on_the_run_equals_the_api_on_its_export(api, trained):
    import mmret

    run = mmret.Retriever.from_pretrained(trained.workdir)  # the latest checkpoint, LoRA merged
    inputs = ["A red square.", _image(60, 80, 5), {"text": "A blue circle.", "image": _image(80, 60, 6)}]
    np.testing.assert_allclose(run.encode_candidates(inputs), api.encode_candidates(inputs), atol=1e-5)
    assert run.instructions == api.instructions and run.temperature == pytest.approx(api.temperature)


def test_api_instructions_tasks_and_formatting(api, trained):
    """task= takes the table's first instruction; instruction and text are formatted as the evaluation formats
    them (UniIR's format_string of the instruction, then of instruction + " " + text: the text keeps its case)."""
    first = api.instructions["mscoco_task0"][0]
    by_task = api.encode_queries(["a dog on a beach"], task="mscoco_task0")
    instruction = uniir_format_string(first)
    text = uniir_format_string(f"{instruction} a dog on a beach")[len(instruction) + 1 :]
    assert text == "a dog on a beach."
    direct = mmret_embedding(trained, instruction=instruction, text=text, image=None)
    np.testing.assert_allclose(by_task[0], direct, atol=1e-5)
    by_text = api.encode_queries([{"text": "a dog on a beach", "instruction": first}])
    np.testing.assert_allclose(by_task, by_text, atol=1e-6)
    plain = api.encode_queries(["a dog on a beach"])  # no instruction
    assert np.abs(plain - by_task).max() > 1e-3
    own = api.encode_queries([{"text": "a dog", "task": "mscoco_task0"}, "a dog"], instruction="Find it.")
    np.testing.assert_allclose(own[0], api.encode_queries(["a dog"], task="mscoco_task0")[0], atol=1e-6)
    np.testing.assert_allclose(own[1], api.encode_queries(["a dog"], instruction="Find it.")[0], atol=1e-6)


def test_api_reports_bad_inputs(api, trained, tmp_path):
    import mmret

    with pytest.raises(ValueError, match="no instructions for task 'nope'.*mscoco_task0"):
        api.encode_queries(["x"], task="nope")
    with pytest.raises(ValueError, match=r"candidates\[1\]: unknown key\(s\) \['instruction'\]"):
        api.encode_candidates(["x", {"text": "y", "instruction": "z"}])
    with pytest.raises(FileNotFoundError, match=r"candidates\[0\]: image .*missing.png: no such file"):
        api.encode_candidates([{"image": str(tmp_path / "missing.png")}])
    with pytest.raises(ValueError, match=r"queries\[0\]: an input needs text or an image"):
        api.encode_queries([{"text": ""}])
    with pytest.raises(TypeError, match="a list of inputs"):
        api.encode_queries("one string")
    with pytest.raises(FileNotFoundError, match="neither an exported retriever"):
        mmret.Retriever.from_pretrained(tmp_path)


# --- retrieval to look at ---------------------------------------------------------------------------

search_tool = load_tool("search")


def _hits(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_search_tool_over_the_runs_embeddings_equals_exact_search(api, trained, capsys):
    """tools/search.py against the run's stored local pool: the query embedded with the run's model (named by
    the embeddings), the hits those of an exact search written here, with the pool file's contents."""
    from mmret.eval.embed import Embeddings

    embeddings = trained.workdir / "eval" / "2" / "embeddings"
    argv = ["--embeddings", str(embeddings), "--pool", "local:mscoco_task0", "--text", "a red square", "--k", "4"]
    assert search_tool.main([*argv, "--task", "mscoco_task0", "--json"]) == 0
    hits = _hits(capsys)
    dids, vectors = Embeddings(embeddings).local_pool("mscoco_task0")
    q = api.encode_queries(["a red square"], task="mscoco_task0")[0]
    scores = vectors.astype(np.float32) @ q
    best = np.argsort(-scores, kind="stable")[:4]
    assert [h["id"] for h in hits] == [dids[i] for i in best]
    np.testing.assert_allclose([h["score"] for h in hits], scores[best], atol=1e-4)
    pool = {
        json.loads(line)["did"]: json.loads(line)
        for line in (Path(trained.cfg.data.root) / "cand_pool" / "local" / "mbeir_mscoco_task0_test_cand_pool.jsonl")
        .read_text()
        .splitlines()
    }
    assert all(h["image"] == pool[h["id"]]["img_path"] for h in hits)
    assert search_tool.main([*argv, "--task", "mscoco_task0"]) == 0  # the table
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "id", "content"] and len(table) == 5


def test_search_tool_over_a_folder_finds_the_image_itself(trained, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        _image(60 + 10 * i, 70, 10 + i).save(folder / f"img{i}.png")
    (folder / "texts.txt").write_text("A red square.\n\nA blue circle.\n")
    argv = ["--model", str(trained.out), "--folder", str(folder), "--image", str(folder / "img1.png"), "--json"]
    assert search_tool.main(argv) == 0
    hits = _hits(capsys)
    assert len(hits) == 5  # 3 images and 2 non-empty lines
    assert hits[0]["id"] == str(folder / "img1.png") and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert {h["id"] for h in hits} >= {f"{folder / 'texts.txt'}:1", f"{folder / 'texts.txt'}:3"}
    assert search_tool.main(["--model", str(trained.out), "--folder", str(folder)]) == 2
    assert "give the query's --text and/or --image" in capsys.readouterr().err
    assert search_tool.main(["--folder", str(folder), "--text", "x"]) == 2
    assert "--folder needs --model" in capsys.readouterr().err


def test_the_runs_evaluation_wrote_a_page_per_task(trained):
    page = trained.workdir / "eval" / "2" / "local" / "mscoco_task0.html"
    text = page.read_text()
    assert text.count("<b>query ") == 20 and text.count("<td>5</td>") == 20  # eval.pages queries, top 5 each
    assert text.count('<img src="data:image/jpeg;base64,') > 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_other_backbones_export_to_their_own_class(family, tiny_mbeir, tmp_path):
    """Qwen2.5-VL and Qwen3-VL runs export to their transformers classes (no missing or unexpected keys), the
    run's pixel bounds in the image processor, and a text input's embedding equal to mmret's."""
    model_dir = make_tiny.write_model_dir(tmp_path / "tiny", family=family)
    cfg = _config(tiny_mbeir, model_dir)
    if family == "qwen3_vl":  # 32-pixel merged patches: bounds that hold its minimum of 64 of them
        pixels = dataclasses.replace(cfg.data.processor, min_pixels=64 * 32 * 32, max_pixels=96 * 32 * 32)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, processor=pixels))
    out = export_run(_unrun(cfg, tmp_path / "run"), tmp_path / "export", step=0)
    spec = json.loads((out / "mmret_embedding.json").read_text())
    assert spec["model_type"] == family
    cls = getattr(
        transformers,
        {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}[family],
    )
    hf, info = cls.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    proc = Processor(processor_dir(cfg), cfg.data.processor)
    image = _image(300, 200, 7)
    theirs = transformers.AutoImageProcessor.from_pretrained(out)(images=[image], return_tensors="np")
    np.testing.assert_array_equal(theirs["image_grid_thw"][0], proc.patcher(image)[1][0])
    ex = proc(text="A dog.", instruction="Find the image.", for_eval=True)
    ids = torch.tensor(ex.input_ids[None], dtype=torch.long)
    length = ids.shape[1]
    with torch.no_grad():
        out_hf = hf(
            input_ids=ids,
            attention_mask=torch.ones(1, 1, length, length, dtype=torch.bool),
            position_ids=torch.arange(length)[None, None].expand(3, 1, -1),
            output_hidden_states=True,
        )
    hidden = out_hf.hidden_states[-1][0].numpy()
    ref = hidden[ex.pool_mask > 0].mean(axis=0)
    ref /= np.linalg.norm(ref)
    batch = proc.collate([ex], max_length=ex.length, max_patches=8)
    got = np.asarray(load_trained(cfg, None, 0).encoder(batch))[0]
    assert np.abs(got - ref).max() < 1e-4


def test_the_readme_snippet_runs_on_an_export(trained, capsys):
    """README's encode-API block, its demo paths pointed at this module's export and the tiny corpus."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("tests/test_export.py` runs this block", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = block.replace("/tmp/mmret_demo/export", str(trained.out))
    code = code.replace("/tmp/mmret_demo/mbeir", str(trained.cfg.data.root))
    assert code != block and str(trained.out) in code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["scores"].shape == (2, 2) and np.all(np.abs(namespace["scores"]) <= 1 + 1e-5)
    assert capsys.readouterr().out.count("[") == 3  # the printed 2 x 2 matrix
