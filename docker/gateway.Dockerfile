# Gateway image: FastAPI gateway and the webhook-delivery worker. Base dependencies only, never
# torch. Build from the repository root:
#
#   docker build -f docker/gateway.Dockerfile -t masactrl-gateway:0.1.0 .
#
# An exact Python patch release on a named Debian release: a rebuild gets the same interpreter.
# To pin by digest as well, append @sha256:... (docker buildx imagetools inspect <tag>).
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from the lock alone: a source edit reuses this layer. The lock is complete
# and hash-checked (`make lock`), so --no-deps: nothing is resolved here. Then every requirement
# pyproject.toml declares must already be met, offline: a lock older than pyproject.toml fails.
COPY pyproject.toml requirements/gateway.txt docker/pyproject_requirements.py ./
RUN pip install --require-hashes --no-deps -r gateway.txt \
 && python pyproject_requirements.py > /tmp/requirements.txt \
 && pip install --no-index -r /tmp/requirements.txt
COPY . .
# The base install only (dependencies already satisfied above); the ml extra must never be
# installed here, and the last command fails the build if anything pulled torch in anyway.
RUN pip install --no-deps . \
 && pip check \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it and volumes can be chowned.
RUN groupadd --system --gid 10001 masactrl \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/masactrl --create-home \
    --shell /usr/sbin/nologin masactrl
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/masactrl
EXPOSE 8000
ENTRYPOINT ["masactrl"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
