# Two commands do all set-up on a fresh machine: `make run` (default pipeline) and `make test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build. Override for GPUs.
TORCH ?= torch==2.13.0
EXPERIMENT ?= experiments/default.yaml

.PHONY: run prepare test ui bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/sftdag run $(EXPERIMENT)

prepare: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/sftdag prepare $(EXPERIMENT)

ui: $(STAMP)
	$(VENV)/bin/sftdag ui

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/prepare.py --data ../shared/data
