# syntax=docker/dockerfile:1
# apiyi-proxy image: build wheels in one stage, install them into a slim runtime.
#   docker build -t apiyi-proxy:0.1.0 .
#   docker run --rm -p 8080:8080 -e APIYI_API_KEY=... apiyi-proxy:0.1.0
ARG PYTHON_IMAGE=python:3.11.9-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY proxy ./proxy
# The project's wheel and every dependency's, at the versions constraints.txt pins, so the
# runtime installs offline exactly what the tests ran with.
RUN pip wheel --constraint constraints.txt --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid proxy --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin proxy
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    pip install --no-index --find-links=/wheels --constraint /tmp/constraints.txt apiyi-proxy
# config/proxy.yaml under the working directory is read if mounted there;
# otherwise point APIYI_PROXY_CONFIG at the file.
WORKDIR /app
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
# No curl in the slim image: the healthcheck is a few lines of Python.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('APIYI_PROXY_SERVER__PORT', '8080'), timeout=4)"]
CMD ["apiyi-proxy", "serve", "--host", "0.0.0.0"]
