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
	$(VENV)/bin/masactrl edit --model $(TINY_MODEL) --image examples/house-and-cat.png \
	  --target-prompt "a red house and a cat jumping" --steps 20 --out out/edit
	$(VENV)/bin/masactrl synthesize --model $(TINY_MODEL) --source-prompt "a cat sitting" \
	  --target-prompt "a cat running" --target-prompt "a cat jumping" --seed 42 --steps 20 \
	  --out out/synthesis
	@echo "Results: $$(ls out/edit/*.png out/synthesis/*.png | tr '\n' ' ')"

clean:
	rm -rf $(VENV) var out
