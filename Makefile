# Two entry points: `make demo` runs the main job on the embedded default, `make test` the suite.
# Both create the virtual environment on first use.

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch: a plain "torch" requirement would pull a multi-GB CUDA build.
# On a GPU machine: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test lint demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m workers.add.toy --out results/toy

clean:
	rm -rf $(VENV) results/toy
