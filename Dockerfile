# lm server image: `docker build -t lm .` then `docker run -p 8000:8000 lm`.
# CUDA build: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t lm:cuda .
FROM python:3.11-slim

# Where the torch wheel comes from: the CPU-only index keeps the image small.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# A C compiler: lm builds its decode-attention kernel for the CPU it runs on (lm/native).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 lm

# The README's install, in two steps so that a code change rebuilds only the last layers:
# torch first, then the project's dependencies read from pyproject.toml alone...
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# ...then the source, and the project itself (its dependencies are already there).
COPY . .
RUN pip install -e .

USER lm
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["lm", "serve", "--host", "0.0.0.0", "--port", "8000"]
