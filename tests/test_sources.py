"""The non-M-BEIR data sources (``data.layout`` nli, caption, beir): each reader against a hand-written root
(the expected examples written out), bad records under both policies, image paths kept inside the root,
negatives files, the synthetic writers (read back clean, byte-identical for a seed), and short trainings
through the real trainer on an NLI root and on M-BEIR mixed with a BEIR root."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import load_tool
from PIL import Image

from mmret.data.bad_records import BadRecordError, BadRecords
from mmret.data.example import Example, Part
from mmret.data.images import OUTSIDE_ROOT, BadImageError
from mmret.data.sources import open_source
from mmret.data.stores import Store
from mmret.data.synthetic.pairs import SCALES, write_synthetic_pairs
from mmret.data.synthetic.scenes import COLOURS

# ----------------------------------------------------------------------------------------------- nli

NLI = (
    "sent0,sent1,hard_neg\n"
    '"  A man, smiling. ",A person smiles.,Nobody smiles.\n'
    "\n"
    '"Two\nlines","He said ""yes"".", No. \n'
)


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def test_nli_rows_render_as_text_pairs(tmp_path):
    path = write(tmp_path / "nli_for_simcse.csv", "\ufeff" + NLI)  # a BOM is fine
    store = open_source("nli", tmp_path, split="train", bad=BadRecords("error"))
    assert isinstance(store, Store) and store.negatives is None
    assert store.queries == [
        Example(Part("nli:0", "A man, smiling."), ("nli:0:pos",), ("nli:0:neg",), task="nli"),
        Example(Part("nli:1", "Two\nlines"), ("nli:1:pos",), ("nli:1:neg",), task="nli"),
    ]
    assert [q.where for q in store.queries] == [f"{path}:2", f"{path}:4"]  # a row's first line
    assert dict(store.candidates) == {
        "nli:0:pos": Part("nli:0:pos", "A person smiles."),
        "nli:0:neg": Part("nli:0:neg", "Nobody smiles."),
        "nli:1:pos": Part("nli:1:pos", 'He said "yes".'),
        "nli:1:neg": Part("nli:1:neg", "No."),
    }
    q = store.queries[1]
    assert store.query_example(q, seed=3, epoch=5) is q and q.query.instruction is None
    assert store.candidate_part("nli:1:neg").modality == "text"
    with pytest.raises(KeyError):
        store.candidate_part("nli:2:pos")


def test_nli_without_hard_neg_column_has_no_negatives(tmp_path):
    write(tmp_path / "nli_for_simcse.csv", "sent1,sent0\nb,a\n")  # columns found by name
    store = open_source("nli", tmp_path, split="train", bad=BadRecords("error"))
    assert store.queries == [Example(Part("nli:0", "a"), ("nli:0:pos",), task="nli")]
    assert dict(store.candidates) == {"nli:0:pos": Part("nli:0:pos", "b")}


def test_nli_bad_rows(tmp_path):
    rows = b"sent0,sent1,hard_neg\na,b,c\nx,y\nd, ,f\ng,\xff\xfeh,i\nj,k,l\n"
    path = write(tmp_path / "nli_for_simcse.csv", rows)
    with pytest.raises(BadRecordError, match=rf"^{re.escape(str(path))}:3: bad_line: expected 3 fields"):
        open_source("nli", tmp_path, split="train", bad=BadRecords("error"))
    bad = BadRecords("skip")
    store = open_source("nli", tmp_path, split="train", bad=bad)
    assert dict(bad.counts) == {"bad_line": 1, "empty_text": 1, "not_utf8": 1}
    assert bad.examples["empty_text"] == [f"{path}:4: empty_text: sent1 is empty"]
    assert [q.id for q in store.queries] == ["nli:0", "nli:4"]  # ids keep the row numbers
    write(tmp_path / "nli_for_simcse.csv", "premise,hypothesis\na,b\n")
    with pytest.raises(BadRecordError, match=r"nli_for_simcse.csv:1: missing_field: the header row must name"):
        open_source("nli", tmp_path, split="train", bad=BadRecords("skip"))  # no header: no policy helps


def test_missing_files_name_the_path_and_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nli_for_simcse.csv: no such file \(a data root of layout 'nli'"):
        open_source("nli", tmp_path, split="train", bad=BadRecords())
    with pytest.raises(FileNotFoundError, match=r"chat.json: no such file .*layout 'caption'"):
        open_source("caption", tmp_path, split="train", bad=BadRecords())
    with pytest.raises(FileNotFoundError, match=r"nowhere: the data root \(data.root"):
        open_source("beir", tmp_path / "nowhere", split="train", bad=BadRecords())
    write(tmp_path / "corpus.jsonl", "")
    write(tmp_path / "queries.jsonl", "")
    with pytest.raises(FileNotFoundError, match=r"qrels/dev.tsv: no such file .*the dev judgements"):
        open_source("beir", tmp_path, split="dev", bad=BadRecords())
    with pytest.raises(ValueError, match=r"data.layout='tsv': no reader"):
        open_source("tsv", tmp_path, split="train", bad=BadRecords())
    with pytest.raises(ValueError, match=r"split='val': a data root of layout 'nli' has one file"):
        open_source("nli", tmp_path, split="val", bad=BadRecords())


def test_a_negatives_file_replaces_the_own_negatives(tmp_path):
    write(tmp_path / "nli_for_simcse.csv", NLI)
    negs = write(
        tmp_path / "negs.jsonl",
        '{"qid": "nli:0", "neg_cand_list": ["nli:1:pos", "nli:1:neg"]}\n{"qid": "nli:1", "neg_cand_list": ["9:1"]}\n',
    )
    bad = BadRecords("skip")
    store = open_source("nli", tmp_path, split="train", bad=bad, negatives_file=negs)
    assert store.negatives == {"nli:0": ("nli:1:pos", "nli:1:neg")}
    assert dict(bad.counts) == {"negative_not_in_pool": 1}
    with pytest.raises(FileNotFoundError, match=r"absent.jsonl: no such file \(data.negatives_file"):
        open_source("nli", tmp_path, split="train", bad=bad, negatives_file=tmp_path / "absent.jsonl")


# ------------------------------------------------------------------------------------------- caption


def record(rid: object, image: object, caption: object = "a caption", **extra: object) -> dict:
    turns = [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": caption}]
    return {"id": rid, "image": image, "conversations": turns, **extra}


def test_captions_render_as_caption_to_image_pairs(tmp_path):
    chat = [
        record("a1", "a1.png", '  "a red circle" on grey '),
        record("b2", "b/b2.png", "Two stars!"),
        record("c3", "a1.png"),
        record("d4", "d4.png", '" a dog"'),  # a second pass of format_string strips what the quotes hid
    ]
    path = write(tmp_path / "chat.json", json.dumps(chat, indent=2))
    Image.new("RGB", (30, 20), (200, 10, 10)).save(write(tmp_path / "images" / "a1.png", b""))
    store = open_source("caption", tmp_path, split="train", bad=BadRecords("error"))
    assert store.queries == [  # UniIR's format_string, as U-MARVEL's CC3M reader applies it
        Example(Part("caption:a1", 'A red circle" on grey.'), ("caption:image:a1.png",), task="caption"),
        Example(Part("caption:b2", "Two stars!"), ("caption:image:b/b2.png",), task="caption"),
        Example(Part("caption:c3", "A caption."), ("caption:image:a1.png",), task="caption"),
        Example(Part("caption:d4", "A dog."), ("caption:image:d4.png",), task="caption"),
    ]
    assert [q.where for q in store.queries] == [f"{path}:{n} [{i}]" for i, n in enumerate((2, 16, 30, 44))]
    assert dict(store.candidates) == {  # the image alone, shared by the records that show it
        "caption:image:a1.png": Part("caption:image:a1.png", None, "images/a1.png"),
        "caption:image:b/b2.png": Part("caption:image:b/b2.png", None, "images/b/b2.png"),
        "caption:image:d4.png": Part("caption:image:d4.png", None, "images/d4.png"),
    }
    assert store.candidate_part("caption:image:a1.png").modality == "image"
    im = store.image("images/a1.png", max_pixels=1000)
    assert im.size == (30, 20) and im.getpixel((0, 0)) == (200, 10, 10)
    with pytest.raises(BadImageError, match="too many pixels"):
        store.image("images/a1.png", max_pixels=599)


def test_caption_bad_records_and_image_paths_outside_the_root(tmp_path):
    chat = [
        record("ok", "ok.png"),
        record("up", "../secret.png"),
        record("abs", "/etc/passwd"),
        {"id": "none", "image": "x.png"},
        record("ok", "again.png"),
        record("empty", "e.png", ' "" '),
        record(7, "n.png"),
        "not a record",
    ]
    path = write(tmp_path / "root" / "chat.json", "[" + ",\n".join(json.dumps(r) for r in chat) + "]")
    with pytest.raises(BadRecordError, match=rf"^{re.escape(str(path))}:2 \[1\]: bad_image_path: .*'\.\.' component"):
        open_source("caption", path.parent, split="train", bad=BadRecords("error"))
    bad = BadRecords("skip")
    store = open_source("caption", path.parent, split="train", bad=bad)
    assert [q.id for q in store.queries] == ["caption:ok"]
    assert dict(bad.counts) == {
        "bad_image_path": 2,
        "missing_field": 1,
        "duplicate_id": 1,
        "empty_text": 1,
        "bad_type": 1,
        "not_object": 1,
    }
    # A path that passes the string checks but resolves outside the root (a symlink) is refused on reading.
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    (path.parent / "images").mkdir()
    (path.parent / "images" / "ok.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(BadImageError) as e:
        store.image(store.candidate_part(store.queries[0].positives[0]).image, max_pixels=100)
    assert e.value.reason == OUTSIDE_ROOT
    write(path, '[{"id": "a", "image": "a.png"},\n {"id": oops}]')
    with pytest.raises(BadRecordError, match=r"chat.json:2: invalid_json: Expecting value"):
        open_source("caption", path.parent, split="train", bad=BadRecords("skip"))  # no policy reads half a list
    write(path, '{"id": "a"}')
    with pytest.raises(BadRecordError, match=r"chat.json:1: invalid_json: the file must be a JSON list"):
        open_source("caption", path.parent, split="train", bad=BadRecords("skip"))


# ---------------------------------------------------------------------------------------------- beir


def beir_root(root: Path, qrels: str, corpus: list[dict] | None = None, queries: list[dict] | None = None) -> Path:
    corpus = corpus or [
        {"_id": "d1", "title": " Paris ", "text": " The capital of France. "},
        {"_id": "d2", "text": "Berlin is in Germany.", "metadata": {}},
        {"_id": "d3", "title": "Rome", "text": ""},
    ]
    queries = queries or [
        {"_id": "q1", "text": " capital of france "},
        {"_id": "q2", "text": "where is berlin"},
        {"_id": "q3", "text": "rome"},
    ]
    write(root / "corpus.jsonl", "".join(json.dumps(d) + "\n" for d in corpus))
    write(root / "queries.jsonl", "".join(json.dumps(q) + "\n" for q in queries))
    return write(root / "qrels" / "train.tsv", "query-id\tcorpus-id\tscore\n" + qrels)


def test_beir_queries_with_positives_and_title_plus_text_documents(tmp_path):
    beir_root(tmp_path, "q2\td2\t1\nq2\td1\t0\nq1\td1\t1\nq1\td3\t2\nq1\td1\t1\n")
    write(tmp_path / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq3\td3\t1\n")
    store = open_source("beir", tmp_path, split="train", bad=BadRecords("error"))
    assert store.queries == [  # queries.jsonl's order; q3 has no train judgement; score 0 is no positive
        Example(Part("beir:q1", "capital of france"), ("beir:d1", "beir:d3"), task="beir"),
        Example(Part("beir:q2", "where is berlin"), ("beir:d2",), task="beir"),
    ]
    assert [q.where for q in store.queries] == [f"{tmp_path / 'queries.jsonl'}:1", f"{tmp_path / 'queries.jsonl'}:2"]
    assert dict(store.candidates) == {
        "beir:d1": Part("beir:d1", "Paris The capital of France."),
        "beir:d2": Part("beir:d2", "Berlin is in Germany."),
        "beir:d3": Part("beir:d3", "Rome"),
    }
    test = open_source("beir", tmp_path, split="test", bad=BadRecords("error"))
    assert test.queries == [Example(Part("beir:q3", "rome"), ("beir:d3",), task="beir")]


def test_beir_bad_records(tmp_path):
    corpus = [{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}, {"_id": "d2"}, {"_id": "d3", "title": 5}]
    queries = [{"_id": "q1", "text": "x"}, {"_id": "q2", "text": "  "}, {"text": "no id"}]
    path = beir_root(tmp_path, "q1\td1\t1\nq9\td1\t1\nq1\td7\t1\nq1\td1\thigh\nq1 d1 1\n", corpus, queries)
    with pytest.raises(BadRecordError, match=rf"^{re.escape(str(tmp_path / 'corpus.jsonl'))}:2: duplicate_id: "):
        open_source("beir", tmp_path, split="train", bad=BadRecords("error"))
    bad = BadRecords("skip")
    store = open_source("beir", tmp_path, split="train", bad=bad)
    assert store.queries == [Example(Part("beir:q1", "x"), ("beir:d1",), task="beir")]
    assert list(store.candidates) == ["beir:d1"]
    assert dict(bad.counts) == {
        "duplicate_id": 1,
        "missing_field": 2,  # d2 without text, a query without _id
        "bad_type": 2,  # d3's title, the score "high"
        "empty_text": 1,
        "unknown_query": 1,
        "unknown_document": 1,
        "bad_line": 1,
    }
    assert bad.examples["unknown_query"] == [f"{path}:3: unknown_query: query 'q9' is not in queries.jsonl"]
    assert bad.examples["unknown_document"] == [f"{path}:4: unknown_document: document 'd7' is not in corpus.jsonl"]
    write(path, "q1\td1\t1\n")
    with pytest.raises(BadRecordError, match=r"train.tsv:1: bad_line: expected the header row"):
        open_source("beir", tmp_path, split="train", bad=BadRecords("skip"))
    with pytest.raises(ValueError, match=r"split='../x': not a qrels file name"):
        open_source("beir", tmp_path, split="../x", bad=BadRecords("skip"))


# --------------------------------------------------------------------------------------- synthetic roots


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "tiny"
    write_synthetic_pairs(out, scale="tiny", seed=0)
    return out


def test_synthetic_roots_are_deterministic_and_read_back_clean(pairs, tmp_path):
    again = write_synthetic_pairs(tmp_path / "again", scale="tiny", seed=0).out
    other = write_synthetic_pairs(tmp_path / "other", scale="tiny", seed=1).out
    written = files(pairs)
    assert written == files(Path(again))
    assert set(written) == set(files(Path(other))) and written != files(Path(other))
    sizes = SCALES["tiny"]
    bad = BadRecords("skip")
    stores = {
        layout: open_source(layout, pairs / layout, split="train", bad=bad) for layout in ("nli", "caption", "beir")
    }
    assert bad.total == 0, bad.report()
    assert len(stores["nli"].queries) == sizes.nli and len(stores["caption"].queries) == sizes.captions
    assert len(stores["beir"].candidates) == sizes.documents
    test = open_source("beir", pairs / "beir", split="test", bad=bad)
    assert len(stores["beir"].queries) + len(test.queries) == sizes.queries and bad.total == 0
    for q in stores["nli"].queries:  # a paraphrase and a contradiction, never the same sentence
        pos, neg = (stores["nli"].candidate_part(c).text for c in (*q.positives, *q.negatives))
        assert len({q.query.text, pos, neg}) == 3
    words = re.compile(r"[a-z]+")
    for q in stores["beir"].queries:  # the query's colour and shape words are in its positive document
        doc = set(words.findall(stores["beir"].candidate_part(q.positives[0]).text.lower()))
        asked = set(words.findall(q.query.text.lower()))
        assert asked & set(COLOURS) and asked & set(COLOURS) <= doc, (q.query.text, doc)
    store = stores["caption"]
    for q in store.queries:  # every colour the caption names is painted in its image
        pixels = np.asarray(store.image(store.candidate_part(q.positives[0]).image, max_pixels=10**5)).reshape(-1, 3)
        for colour in set(words.findall(q.query.text.lower())) & set(COLOURS):
            near = np.abs(pixels.astype(int) - COLOURS[colour]).max(axis=1) <= 20
            assert near.any(), (q.query.text, colour)


def test_the_writer_cli(tmp_path, capsys):
    tool = load_tool("make_synthetic_pairs")
    assert tool.main(["--out", str(tmp_path / "demo"), "--scale", "demo", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'demo' / 'nli'}: layout nli, {SCALES['demo'].nli} rows" in out
    seconds = float(re.search(r"in ([0-9.]+)s$", out.strip()).group(1))
    assert seconds < 10, out
    assert (tmp_path / "demo" / "caption" / "images" / "SYN_train_000299.png").is_file()
    assert tool.main(["--out", str(tmp_path / "demo")]) == 2  # exists: --force to replace
    assert "output exists" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- training


def train_config(root: Path, proc: Path, **data) -> dict:
    return {
        "model": {"preset": "tiny", "seed": 0},
        "data": {
            "root": str(root),
            "processor_dir": str(proc),
            "processor": {"max_pixels": 64 * 28 * 28, "max_text_tokens": 64},
            "pipeline": {
                "batch_size": 8,
                "max_query_length": 96,
                "max_candidate_length": 96,
                "max_query_patches": 8 * 64,
                "max_candidate_patches": 8 * 64,
            },
            **data,
        },
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "optimizer": {"learning_rate": 1e-3, "total_steps": 2, "warmup_steps": 0},
        "log_every": 1,
        "checkpoint": {"every": 2, "keep": 1, "async_save": False},
    }


def test_the_pipeline_draws_nli_hard_negatives_and_mixes_beir(pairs, processor_dir, tiny_mbeir):
    from mmret.data.pipeline import PipelineConfig, mixed_train_dataset, train_dataset
    from mmret.data.processor import Processor
    from mmret.data.stores import RawStore

    proc = Processor(processor_dir)
    nli = open_source("nli", pairs / "nli", split="train", bad=BadRecords())
    cfg = PipelineConfig(batch_size=4, num_negatives=1, max_query_patches=4 * 64, max_candidate_patches=4 * 64)
    batch = next(iter(train_dataset(nli, proc, cfg, process_index=0, process_count=1)))
    assert batch["meta"]["dids"] == [d for q in batch["meta"]["qids"] for d in (f"{q}:pos", f"{q}:neg")]
    beir = open_source("beir", pairs / "beir", split="train", bad=BadRecords())
    mbeir = RawStore(tiny_mbeir, "train", ["mscoco_task0"])
    cfg = PipelineConfig(batch_size=8, max_query_patches=8 * 1200, max_candidate_patches=8 * 1200)
    batch = next(iter(mixed_train_dataset([(mbeir, 1.0), (beir, 1.0)], proc, cfg, process_index=0, process_count=1)))
    qids = batch["meta"]["qids"]
    assert {q.startswith("beir:") for q in qids} == {True, False}
    assert batch["positive_mask"].sum(axis=1).min() >= 1


@pytest.mark.parametrize("layout", ["nli", "caption", "mbeir+beir"])
def test_the_trainer_trains_on_the_new_layouts(layout, pairs, processor_dir, tiny_mbeir, tmp_path):
    from mmret.train.trainer import train

    if layout == "mbeir+beir":
        beir = {"root": str(pairs / "beir"), "layout": "beir", "weight": 1.0}
        cfg = train_config(tiny_mbeir, processor_dir, tasks=["mscoco_task0"], mix=[beir])
    else:  # the same shapes in every run: one compile of the step
        cfg = train_config(pairs / layout, processor_dir, layout=layout)
    train(cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert {"loss", "grad_norm", "learning_rate"} <= set(r)
        assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
