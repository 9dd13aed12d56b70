# bidsenc as a BIDS App:  docker run --gpus all -v /data:/data:ro -v /out:/out bidsenc/bidsenc /data /out participant
# Works as an arbitrary user (-u "$(id -u):$(id -g)") and with --read-only: every cache goes to /tmp or the work dir.
FROM python:3.11.11-slim-bookworm

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="bidsenc" \
      org.opencontainers.image.description="Voxelwise encoding models of story-listening fMRI from language and speech models (a BIDS App)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# man bidsenc: slim images carry no man reader (and drop Debian's pages, not ours in /usr/local).
RUN apt-get update \
    && apt-get install -y --no-install-recommends man-db=2.11.2-2 \
    && rm -rf /var/lib/apt/lists/*

# Every package at the exact version of requirements/lock.txt, so that an image built today and one
# built next year hold the same software. The PyPI torch wheel is built with CUDA 13 (NVIDIA driver
# 580 or newer on the host); for older drivers build with e.g.
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 (the same torch version, another CUDA).
ARG TORCH_INDEX_URL=""
COPY pyproject.toml README.md /src/
COPY requirements/lock.txt /src/requirements/lock.txt
COPY bidsenc /src/bidsenc
COPY docs/bidsenc.1 /usr/local/share/man/man1/bidsenc.1
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install -c /src/requirements/lock.txt torch --index-url "$TORCH_INDEX_URL"; \
    fi \
    && pip install -c /src/requirements/lock.txt /src \
    && rm -rf /src \
    && mandb -q

# The default run's models, baked in as plain folders that bidsenc finds by hub id
# (BIDSENC_MODEL_DIR/<org>/<name>) without any hub access.
ENV BIDSENC_MODEL_DIR=/opt/bidsenc/models
RUN python -c "from huggingface_hub import snapshot_download as get; \
patterns = ['*.json', '*.txt', '*.model', '*.safetensors', 'pytorch_model.bin']; \
[get(name, local_dir=f'/opt/bidsenc/models/{name}', allow_patterns=patterns) \
 for name in ('facebook/opt-125m', 'openai/whisper-tiny')]" \
    && rm -rf /opt/bidsenc/models/*/*/.cache \
    && chmod -R a+rX /opt/bidsenc \
    && python -c "import bidsenc; print(bidsenc.__version__)" > /version

# Nothing is written to $HOME or the image at run time: caches to /tmp, results to the bound folders.
# Models other than the baked ones: bind a folder of copies at $BIDSENC_MODEL_DIR (or use --model-dir),
# or allow downloads (--allow-download) into HF_HOME, ideally a bound folder.
ENV HF_HOME=/tmp/bidsenc-hf \
    TORCH_HOME=/tmp/bidsenc-torch \
    MPLCONFIGDIR=/tmp/bidsenc-matplotlib \
    XDG_CACHE_HOME=/tmp/bidsenc-cache \
    HOME=/tmp \
    BIDSENC_CONTAINER_TAG="bidsenc/bidsenc:${VERSION}"

RUN useradd --no-create-home --uid 1000 --shell /usr/sbin/nologin bidsenc
USER 1000
WORKDIR /tmp
ENTRYPOINT ["/usr/local/bin/bidsenc"]
