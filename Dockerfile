# syntax=docker/dockerfile:1
# Convoy on CPU: PyTorch (CPU build) and ONNX Runtime (CPU). For GPUs use Dockerfile.gpu.
#   docker build -t convoy:cpu .
#   docker run -p 8000-8002:8000-8002 -v "$PWD/models:/models:ro" convoy:cpu
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/convoy
ENV PATH=/opt/convoy/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4"
# The native front end (server/native) is Rust: a toolchain in the build stage only, so the
# wheel carries convoy.server._native (checked below: without it Convoy would fall back to
# the Python front end).
ARG RUST_VERSION=1.95.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
       | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY convoy ./convoy
COPY server ./server
COPY batching ./batching
COPY runtimes ./runtimes
COPY protos ./protos
COPY loadtests ./loadtests
# The onnx extra names onnxruntime-gpu; on CPU the plain onnxruntime wheel is the smaller fit.
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip install "$(ls /wheels/convoy_inference-*.whl)[torch,text,redis]" "onnxruntime>=1.18" "onnx>=1.16" \
    && python3 -c "import convoy.server._native"

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 PATH=/opt/convoy/bin:$PATH
RUN groupadd --system --gid 10001 convoy \
    && useradd --system --uid 10001 --gid convoy --home-dir /home/convoy --create-home convoy \
    && mkdir -p /models && chown convoy:convoy /models
COPY --from=build /opt/convoy /opt/convoy
USER 10001:10001
WORKDIR /home/convoy
VOLUME ["/models"]
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["convoy", "serve"]
CMD ["--model-repository", "/models", "--http-port", "8000", "--grpc-port", "8001", "--metrics-port", "8002"]
