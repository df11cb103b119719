# Two entry points: `make demo` runs the main job on the embedded default, `make test` the suite.
# Both create the virtual environment and install the Fashion-MNIST idx files on first use.

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

# The Fashion-MNIST idx files (train and test splits): the main job's data and what its tests read.
# A Debian package, installed as root or through sudo.
FASHION_IDX := /usr/share/datasets/fashion-mnist
FASHION_FILES := $(FASHION_IDX)/train-images-idx3-ubyte.gz $(FASHION_IDX)/t10k-images-idx3-ubyte.gz
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(FASHION_FILES) &:
	@echo "installing the Fashion-MNIST idx files (Debian package dataset-fashion-mnist)"
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

lint: $(STAMP)
	$(PY) -m ruff check .

# every test runs: nothing is skipped for missing data
test: lint $(FASHION_FILES)
	$(PY) -m pytest -q

# The main job (jobs/fashion-mnist.yaml): Fashion-MNIST shards into a local object-storage folder,
# the shipped teacher distilled with ADD on a local Ray, evaluated with the benchmark protocol,
# registered in MLflow (./runs/mlflow.db) as `candidate`; the table in results/fashion-mnist/.
# The console shows a bar per phase and the table; Ray's and the workers' output is in runs/fashion-mnist/run.log.
DATA := runs/data

$(DATA)/fashion-mnist-%/_manifest.json: $(STAMP) $(FASHION_FILES)
	$(VENV)/bin/addctl prepare-data fashion-mnist $(DATA)/fashion-mnist-$* --split $*

demo: $(STAMP) $(DATA)/fashion-mnist-train/_manifest.json $(DATA)/fashion-mnist-test/_manifest.json
	$(VENV)/bin/addctl run jobs/fashion-mnist.yaml

toy: $(STAMP)
	$(VENV)/bin/addctl toy --out results/toy

clean:
	rm -rf $(VENV) results/toy results/fashion-mnist
