# Everything installs into .venv; nothing is needed beyond python3 and the package registries.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
TINY_MODEL := var/models/tiny-sd

# torch is installed on its own, after the lock, from the index of one build flavour: its CPU
# build by default, so a laptop or CI never downloads gigabytes of CUDA libraries. The pin carries
# the flavour (`+cpu`), so pip cannot fall back to PyPI's plain `torch`, which is a CUDA build.
# On a CUDA host: `make install TORCH_FLAVOUR=cu126` (any flavour PyTorch publishes an index for).
TORCH_VERSION := 2.13.0
TORCH_FLAVOUR ?= cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/$(TORCH_FLAVOUR)
# Everything else comes from hash-checked lock files that `make lock` writes (README, Development).
LOCK := requirements/dev.txt

.PHONY: redis-bin install lock test lint format demo up down stack-redis clean

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo \
	  "The lock files are resolved for Python 3.11+; use PYTHON=python3.11 or newer."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	@echo "installing the locked dependencies and torch ($(TORCH_FLAVOUR) build) into $(VENV); log: $(VENV)/pip.log"
	# The lock is complete (torch aside), so nothing outside it is resolved: --no-deps. It goes
	# first, so that torch's own dependencies are already there and only torch comes from its index.
	$(PIP) install --require-hashes --no-deps -r $(LOCK) > $(VENV)/pip.log 2>&1 \
	  || { cat $(VENV)/pip.log; exit 1; }
	$(PIP) install "torch==$(TORCH_VERSION)+$(TORCH_FLAVOUR)" --index-url $(TORCH_INDEX) \
	  >> $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	# With no index, every requirement pyproject.toml declares (extras included) must already be
	# met: a lock older than pyproject.toml fails here. setuptools, to build, is in the lock too.
	$(PIP) install --no-index --no-build-isolation -e ".[ml,test]" >> $(VENV)/pip.log 2>&1 \
	  || { cat $(VENV)/pip.log; exit 1; }
	$(PY) -m pip check
	$(PY) -c "import torch, diffusers, fastapi, celery, moto, schemathesis"
	touch $@

install: $(STAMP)

# Rewrites the lock files from pyproject.toml's ranges, keeping every pin that still satisfies
# them; `make lock UPGRADE=1` moves every pin to the newest release the ranges allow. One lock per
# installation, resolved together so that they agree on every shared pin:
#   requirements/dev.txt      base + ml + test: this Makefile and CI (torch installed beside it)
#   requirements/worker.txt   base + ml: the GPU worker image (its CUDA torch installed before it)
#   requirements/gateway.txt  base only: the gateway image, never torch
# torch itself is resolved (its CPU build: its dependencies go into the locks) but not written:
# each installation takes its own flavour of it. Its wheels are looked up in PIP_FIND_LINKS when
# that is set (a local wheelhouse), else on PyTorch's page of CPU torch wheels. uv lives in its
# own small venv: the lock must be writable when .venv is stale (a dependency was just added).
UV_VERSION := 0.13.9
UV_VENV := .cache/uv
LOCK_PYTHON := 3.11
TORCH_WHEELS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/cpu/torch/)
COMPILE = UV_PYTHON_DOWNLOADS=never $(UV_VENV)/bin/uv pip compile pyproject.toml --quiet \
	--universal --python-version $(LOCK_PYTHON) --generate-hashes \
	--custom-compile-command "make lock" --find-links $(TORCH_WHEELS) \
	--constraint $(UV_VENV)/torch-cpu.txt --no-emit-package torch $(if $(UPGRADE),--upgrade)

lock:
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip --disable-pip-version-check -q install "uv==$(UV_VERSION)"
	echo "torch==$(TORCH_VERSION)+cpu" > $(UV_VENV)/torch-cpu.txt
	$(COMPILE) --extra ml --extra test -o requirements/dev.txt
	$(COMPILE) --extra ml --constraint requirements/dev.txt -o requirements/worker.txt
	$(COMPILE) --constraint requirements/dev.txt -o requirements/gateway.txt

redis-bin:
	@command -v redis-server >/dev/null || bash .ci/install-redis

test: $(STAMP) redis-bin
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

$(TINY_MODEL)/model_index.json: | $(STAMP)
	$(VENV)/bin/masactrl tiny-model $(TINY_MODEL)

# The local stack (docs/local-stack.md): Redis, the gateway on 127.0.0.1:8000, a worker for the
# offline tiny checkpoint (or MASACTRL_MODEL) and the webhook worker, with pids in var/run and
# logs in var/log. `demo` runs an edit, a synthesis and a layout-guided edit through the HTTP
# API into out/, reusing a stack that `up` started or starting (and afterwards stopping) its own.
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
	rm -rf $(VENV) $(UV_VENV) var out
