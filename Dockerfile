# bnfold inference image.
#
#   docker build -t bnfold:0.1.0 .
#   docker run --rm -p 8000:8000 bnfold:0.1.0
#
# Stage "build" installs CPU torch and bnfold, trains the default digits model, folds its batch
# norms, verifies the folded model and exports it to /build/models (the build fails if
# verification fails). Stage "runtime" gets only that model repository and the service's
# dependencies from deploy/requirements-serve.txt: no torch, no compiler, non-root.
#
# Build arguments (`--build-arg NAME=VALUE`; the defaults build from the internet):
#   PIP_INDEX_URL        package index of both stages (a mirror or a private index)
#   PIP_EXTRA_INDEX_URL  further indexes, space-separated (default: none)
#   TORCH_INDEX_URL      the index the build stage's torch comes from (default: PyTorch's CPU index)
#   ONNXRUNTIME          onnxruntime (CPU, default) or onnxruntime-gpu (the CUDA variant; see README)
# Local wheels: `--build-context wheels=DIR` mounts DIR at /wheels for the pip installs of both
# stages (pip's find-links; nothing of it stays in the image). BuildKit or podman; without it
# the "wheels" stage below is empty.

FROM scratch AS wheels

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# pip reads these from the environment of each RUN; none of them is kept in the image's ENV.
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=/wheels
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /build
# CPU-only torch first, so the project's `torch` extra does not pull the multi-GB CUDA build.
# A CPU wheel in /wheels (torch-2.13.0+cpu) wins over the index's torch==2.13.0 (a local version
# sorts higher), so TORCH_INDEX_URL may then be PyPI, whose own torch is the CUDA build.
RUN --mount=type=bind,from=wheels,target=/wheels \
    pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX_URL"
COPY pyproject.toml README.md ./
COPY bnfold/ bnfold/
COPY service/ service/
# "./[extras]" (not ".[extras]") so hadolint reads it as a local path, not an unpinned package.
RUN --mount=type=bind,from=wheels,target=/wheels \
    pip install --no-cache-dir "./[torch,serve]" \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /build/wheels .
# Train, fold, verify and export the default model into /build/models/digits/1/model.onnx.
RUN bnfold quickstart --no-serve

FROM python:3.11-slim AS runtime
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=/wheels
# onnxruntime-gpu (optionally with pip extras, e.g. onnxruntime-gpu[cuda,cudnn]) replaces
# onnxruntime in the requirements file: same version bounds, same `onnxruntime` module.
ARG ONNXRUNTIME=onnxruntime
WORKDIR /app
COPY deploy/requirements-serve.txt /tmp/requirements-serve.txt
RUN case "$ONNXRUNTIME" in onnxruntime | onnxruntime-gpu | "onnxruntime-gpu["*"]") ;; \
      *) echo "ONNXRUNTIME must be onnxruntime or onnxruntime-gpu[extras], got '$ONNXRUNTIME'" >&2; exit 2 ;; esac
RUN --mount=type=bind,from=wheels,target=/wheels \
    sed -i "s/^onnxruntime\([<>=]\)/$ONNXRUNTIME\1/" /tmp/requirements-serve.txt \
    && pip install --no-cache-dir --requirement /tmp/requirements-serve.txt
COPY --from=build /build/wheels/ /tmp/wheels/
RUN pip install --no-cache-dir --no-deps /tmp/wheels/bnfold-*.whl \
    && rm -rf /tmp/wheels /tmp/requirements-serve.txt \
    && groupadd --system --gid 10001 bnfold \
    && useradd --system --uid 10001 --gid bnfold --home-dir /app --no-create-home --shell /usr/sbin/nologin bnfold
# Owned by root and read-only for the service user: the server never writes its models.
COPY --from=build /build/models/ /app/models/
# Configuration (see the README's configuration table); override with `docker run -e ...`.
ENV BNFOLD_MODEL_REPOSITORY=/app/models \
    BNFOLD_HOST=0.0.0.0 \
    BNFOLD_PORT=8000 \
    BNFOLD_LOG_LEVEL=info
USER 10001:10001
EXPOSE 8000
# Mount your own model repository here (`-v "$PWD/models:/app/models:ro"`).
VOLUME ["/app/models"]
# slim images have no curl: probe readiness with the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('BNFOLD_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "service"]
