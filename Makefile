# The two commands the README opens with: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= /tmp/mmret_demo

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[torch,dev]"
	touch $@

demo: setup
	$(PY) tools/make_tiny_model.py --out $(WORKDIR)/tiny_model --preset tiny --seed 0 --force
	$(PY) tools/make_synthetic_mbeir.py --out $(WORKDIR)/mbeir --scale demo --seed 0 --force
	$(PY) tools/make_synthetic_pairs.py --out $(WORKDIR)/pairs --scale demo --seed 0 --force
	rm -rf $(WORKDIR)/run
	$(PY) -m mmret.launch --config=configs/umarvel.py:demo --workdir=$(WORKDIR)/run \
		--config.model.hf_dir=$(WORKDIR)/tiny_model --config.data.root=$(WORKDIR)/mbeir \
		--config.stages.text.overrides.data.root=$(WORKDIR)/pairs/nli \
		--config.stages.caption.overrides.data.root=$(WORKDIR)/pairs/caption

# Two workers (pytest-xdist), each test module on one of them (module fixtures are built once). xdist hands the
# modules out by their number of tests, most first (its loadscope reorder): measured faster on 2 cores (947 s) than
# tests/conftest.py's longest-first order (--no-loadscope-reorder: 1,090 s), which runs the heavy modules together.
test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache
