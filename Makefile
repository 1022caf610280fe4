# Everything installs into .venv; nothing is needed beyond python3 and the package registries.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
TINY_MODEL := var/models/tiny-sd

.PHONY: redis-bin install test lint format demo up down clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build first: letting the project pull torch would fetch a multi-GB CUDA build.
	$(PIP) install "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
	$(PIP) install -e ".[ml,test]" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, diffusers, fastapi, celery"
	touch $@

install: $(STAMP)

redis-bin:
	@command -v redis-server >/dev/null || bash .ci/install-redis

test: $(STAMP) redis-bin
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

$(TINY_MODEL)/model_index.json: | $(STAMP)
	$(VENV)/bin/masactrl tiny-model $(TINY_MODEL)

demo: $(STAMP) $(TINY_MODEL)/model_index.json
	$(PY) -m masactrl_cli.demo --model $(TINY_MODEL) --out out

clean:
	rm -rf $(VENV) var out
