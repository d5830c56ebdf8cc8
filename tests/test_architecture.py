"""The house's layering (ARCHITECTURE.md), read from the source by tools/import_graph.py: each part imports
only parts below it, evaluation and training never import each other, no import cycle between parts."""

from __future__ import annotations

from helpers import load_tool

graph = load_tool("import_graph")

#: Layers, lowest first; a part may import its own layer and those below.
LAYERS = [
    {
        "mmret",
        "mmret.atomic_dir",
        "mmret.progress",
        "mmret.losses",
        "mmret.lora",
        "mmret.optim",
        "mmret.grad_cache",
        "mmret.multihost",
    },
    {"mmret.models"},
    {"mmret.sharding", "mmret.convert", "mmret.data"},
    {"mmret.recipe", "mmret.build", "mmret.checkpoints"},  # the shared floor
    {"mmret.tasks", "mmret.eval"},
    {"mmret.train", "mmret.mining", "mmret.distill", "mmret.export", "mmret.pretrained"},
    {"mmret.chain"},
    {"mmret.launch"},
]
#: Upward imports that run only when called: (importer, imported, why).
LAZY_UPWARD = {
    ("mmret.models", "mmret.convert"),  # mmret.models.from_hf: the public entry point of the loader in convert/
    ("mmret", "mmret.pretrained"),  # mmret.Retriever: the public encode API, imported on first use
}


def layer(part: str) -> int:
    found = [i for i, parts in enumerate(LAYERS) if part in parts]
    assert found, f"{part}: a part in no layer (add it to LAYERS and to ARCHITECTURE.md)"
    return found[0]


def test_every_part_imports_only_its_layer_and_below():
    eager, every = graph.edges(), graph.edges(lazy=True)
    wrong = [(a, b) for a, targets in eager.items() for b in targets if layer(b) > layer(a)]
    assert wrong == []
    lazy_wrong = [
        (a, b) for a, targets in every.items() for b in targets if layer(b) > layer(a) and (a, b) not in LAZY_UPWARD
    ]
    assert lazy_wrong == []


def test_eval_and_train_are_independent():
    every = graph.edges(lazy=True)
    assert "mmret.train" not in every["mmret.eval"] and "mmret.eval" not in every["mmret.train"]
    assert not {"mmret.train", "mmret.eval"} & every["mmret.tasks"]
    assert "mmret.train" not in every.get("mmret.mining", set())  # mining reads a run; it never trains
    assert "mmret.train" not in every.get("mmret.distill", set())  # nor does the teacher's builder


def test_no_cycles_between_parts():
    assert graph.cycles(graph.edges()) == []


def test_the_checker_sees_imports_and_cycles(tmp_path):
    """The reader itself: relative, aliased, lazy and TYPE_CHECKING imports, and a planted cycle."""
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nimport mmret.losses\nfrom . import lora\n"
        "if TYPE_CHECKING:\n    from mmret.recipe import TrainerConfig\n"
        "def f():\n    from mmret.eval import run\n"
    )
    found = sorted(graph.imports("mmret.m", src))
    assert found == [("mmret.eval.run", True), ("mmret.lora", False), ("mmret.losses", False), ("mmret.recipe", True)]
    assert graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_model_and_step_code_import_without_the_data_stack():
    """An accelerator image without grain, scann, ml_collections or tensorflow-datasets can build the model
    and the bi-encoder's step (benchmarks/, the GPU suite)."""
    import subprocess
    import sys

    code = (
        "import sys\nimport mmret.models, mmret.tasks.bi_encoder.step, mmret.models.retriever, mmret.sharding\n"
        "heavy = ('grain', 'scann', 'ml_collections', 'tensorflow_datasets', 'array_record', 'tensorflow')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert r.stdout.strip() == "[]", r.stdout
