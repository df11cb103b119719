# Two entry points: `make demo` runs the main job on the embedded default, `make test` the suite.
# Both create the virtual environment on first use.

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch: a plain "torch" requirement would pull a multi-GB CUDA build.
# On a GPU machine: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test lint demo toy clean

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

# The main job (jobs/fashion-mnist.yaml): Fashion-MNIST shards into a local object-storage folder,
# the shipped teacher distilled with ADD on a local Ray, evaluated with the benchmark protocol,
# registered in MLflow (./runs/mlflow.db) as `candidate`; the table in results/fashion-mnist/.
FASHION_IDX := /usr/share/datasets/fashion-mnist
DATA := runs/data

$(FASHION_IDX)/train-images-idx3-ubyte.gz:
	@echo "installing the Fashion-MNIST idx files (Debian package dataset-fashion-mnist)"
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq dataset-fashion-mnist

$(DATA)/fashion-mnist-%/_manifest.json: $(STAMP) $(FASHION_IDX)/train-images-idx3-ubyte.gz
	$(VENV)/bin/addctl prepare-data fashion-mnist $(DATA)/fashion-mnist-$* --split $*

demo: $(STAMP) $(DATA)/fashion-mnist-train/_manifest.json $(DATA)/fashion-mnist-test/_manifest.json
	$(VENV)/bin/addctl run jobs/fashion-mnist.yaml

toy: $(STAMP)
	$(VENV)/bin/addctl toy --out results/toy

clean:
	rm -rf $(VENV) results/toy results/fashion-mnist
