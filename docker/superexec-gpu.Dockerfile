# syntax=docker/dockerfile:1
# FedTime-MAGNET executor image, CUDA: ClientApps (and optionally the ServerApp)
# on an NVIDIA GPU host. The PyPI torch wheel bundles the CUDA runtime, so only
# the host's NVIDIA driver + NVIDIA Container Toolkit are needed (see
# docs/deployment.md). Build context = repository root; versions from docker/.env.
ARG FLWR_VERSION
ARG PYTHON_VERSION=3.11
FROM flwr/superexec:${FLWR_VERSION}-py${PYTHON_VERSION}-ubuntu24.04

ARG FLWR_VERSION
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FEDTIME_CACHE_DIR=/app/cache \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 49999:49999
WORKDIR /app/src

# 1) torch first, CUDA build (PyPI's Linux x86_64 wheel; or a download.pytorch.org/whl/cuXYZ index).
RUN python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# 2) the project; the base image's flwr is kept (see superexec-cpu.Dockerfile).
COPY --chown=49999:49999 pyproject.toml README.md ./
COPY --chown=49999:49999 data_partition ./data_partition
COPY --chown=49999:49999 model ./model
COPY --chown=49999:49999 fedtime ./fedtime
COPY --chown=49999:49999 server_app ./server_app
COPY --chown=49999:49999 client_app ./client_app
RUN sed -i '/"flwr\[simulation\]/d' pyproject.toml \
    && python -m pip install --no-cache-dir . "flwr==${FLWR_VERSION}" "torch==${TORCH_VERSION}" \
    && python -c "import torch, flwr, model, fedtime, server_app, client_app; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && mkdir -p /app/cache /app/outputs

WORKDIR /app
ENTRYPOINT ["flower-superexec"]
