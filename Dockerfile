# lm server image: `docker build -t lm .` then `docker run -p 8000:8000 lm`.
# CUDA build: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t lm:cuda .
FROM python:3.11-slim

# Where the torch wheel comes from: the CPU-only index keeps the image small.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# A C compiler: lm builds its decode-attention kernel for the CPU it runs on (lm/native).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first, in its own layer, so that code changes do not download it again.
RUN pip install --index-url "${TORCH_INDEX}" torch

COPY . .
RUN pip install -e . \
    && useradd --create-home --uid 10001 lm

USER lm
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["lm", "serve", "--host", "0.0.0.0", "--port", "8000"]
