# Everything installs into .venv; nothing is needed beyond python3 and the package registries.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
TINY_MODEL := var/models/tiny-sd

.PHONY: redis-bin install test lint format demo up down stack-redis clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build first: letting the project pull torch would fetch a multi-GB CUDA build.
	@echo "installing torch (CPU build) and the project into $(VENV); log: $(VENV)/pip.log"
	$(PIP) install "torch==2.13.0" > $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	$(PIP) install -e ".[ml,test]" >> $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	$(PY) -c "import torch, diffusers, fastapi, celery, moto, schemathesis"
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

# The local stack (docs/local-stack.md): Redis, the gateway on 127.0.0.1:8000, a worker for the
# offline tiny checkpoint (or MASACTRL_MODEL) and the webhook worker, with pids in var/run and
# logs in var/log. `demo` runs an edit and a synthesis through the HTTP API into out/, reusing a
# stack that `up` started or starting (and afterwards stopping) its own.
demo: $(STAMP) $(TINY_MODEL)/model_index.json stack-redis
	@$(VENV)/bin/masactrl demo

up: $(STAMP) $(TINY_MODEL)/model_index.json stack-redis
	@$(VENV)/bin/masactrl up

down:
	@if [ -x $(VENV)/bin/masactrl ]; then $(VENV)/bin/masactrl down; fi

# The stack starts its own redis-server unless MASACTRL_REDIS_URL is set. Install one the way
# `make test` does; where that is not possible, `masactrl up` says how.
stack-redis:
	@command -v redis-server >/dev/null || [ -n "$$MASACTRL_REDIS_URL" ] || \
	  bash .ci/install-redis || true

clean:
	rm -rf $(VENV) var out
