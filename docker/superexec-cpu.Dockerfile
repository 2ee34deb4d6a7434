# syntax=docker/dockerfile:1
# FedTime-MAGNET executor image, CPU: runs the ServerApp (superexec-serverapp)
# and CPU ClientApps (superexec-clientapp-i). Build context = repository root:
#   docker compose -f docker/compose.yml build
# Versions come from docker/.env (FLWR_VERSION is pinned there and nowhere else).
ARG FLWR_VERSION
ARG PYTHON_VERSION=3.11
FROM flwr/superexec:${FLWR_VERSION}-py${PYTHON_VERSION}-ubuntu24.04

ARG FLWR_VERSION
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FEDTIME_CACHE_DIR=/app/cache \
    PIP_DISABLE_PIP_VERSION_CHECK=1

USER 49999:49999
WORKDIR /app/src

# 1) torch first, CPU-only wheel (keeps CUDA libraries out of the image).
RUN python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# 2) the project and its dependencies. The flwr line is dropped so the base
#    image's flwr (== the SuperLink's version) stays and the Ray simulation
#    extra is not installed; flwr is re-pinned explicitly.
COPY --chown=49999:49999 pyproject.toml README.md ./
COPY --chown=49999:49999 data_partition ./data_partition
COPY --chown=49999:49999 model ./model
COPY --chown=49999:49999 fedtime ./fedtime
COPY --chown=49999:49999 server_app ./server_app
COPY --chown=49999:49999 client_app ./client_app
RUN sed -i '/"flwr\[simulation\]/d' pyproject.toml \
    && python -m pip install --no-cache-dir . "flwr==${FLWR_VERSION}" "torch==${TORCH_VERSION}" \
    && python -c "import torch, flwr, model, fedtime, server_app, client_app; print('torch', torch.__version__, 'flwr', flwr.__version__)" \
    && mkdir -p /app/cache /app/outputs

WORKDIR /app
ENTRYPOINT ["flower-superexec"]
