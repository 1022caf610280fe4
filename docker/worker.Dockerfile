# GPU worker image: the engine (torch, diffusers) plus the Celery worker. Build from the repository
# root:
#
#   docker build -f docker/worker.Dockerfile -t masactrl-worker:0.1.0 .
#
# The CUDA "base" flavour carries only the CUDA runtime and the NVIDIA container environment
# (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES); torch's wheels bring their own cuBLAS and
# cuDNN, so the larger "runtime" flavour would ship those libraries twice. Its CUDA major version
# matches the torch wheel below (CUDA 13 needs an NVIDIA driver >= 580 on the host).
# To pin by digest as well, append @sha256:... (docker buildx imagetools inspect <tag>).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Ubuntu 24.04's python3 is 3.12; the runtime stage installs the same package, so the venv's
# interpreter link stays valid there. Not pinned to a package version: the archive keeps only the
# current one, and the base image tag already fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The same torch version as the development install (Makefile's TORCH_VERSION), in its CUDA
# build: PyPI's plain wheel is built for CUDA 13. For older drivers take another flavour from
# PyTorch's index, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 --build-arg TORCH_VERSION=2.13.0+cu126
# torch is not in the lock (each flavour is a different file); its own metadata pins its CUDA
# libraries exactly.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
# hadolint ignore=DL3013
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
# Then everything else from the hash-checked lock (base + ml extra), --no-deps as it is complete,
# and a check, offline, that it meets every requirement pyproject.toml declares. Both layers above
# are reused on a source edit.
COPY pyproject.toml requirements/worker.txt docker/pyproject_requirements.py ./
RUN pip install --require-hashes --no-deps -r worker.txt \
 && python pyproject_requirements.py --extra ml > /tmp/requirements.txt \
 && pip install --no-index -r /tmp/requirements.txt
COPY . .
RUN pip install --no-deps . \
 && pip check

FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/masactrl \
    HF_HOME=/var/cache/huggingface \
    MASACTRL_MODEL_CACHE_DIR=/var/cache/huggingface/masactrl-models
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it and volumes can be chowned.
RUN groupadd --system --gid 10001 masactrl \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/masactrl --create-home \
    --shell /usr/sbin/nologin masactrl \
 && mkdir -p /var/cache/huggingface \
 && chown 10001:10001 /var/cache/huggingface
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/masactrl
# Model weights (Hub downloads, and catalog models with an s3:// source under masactrl-models/):
# mount a volume here so they are downloaded once, not on every container start.
VOLUME ["/var/cache/huggingface"]
ENTRYPOINT ["masactrl"]
CMD ["worker", "--model", "sd15"]
