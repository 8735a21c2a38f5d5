# syntax=docker/dockerfile:1
# stream-http as a container: server.py on its locked dependencies, as an unprivileged user, data in a volume.
#
#   docker build -t stream-http .
#   docker run -p 8000:8000 -v stream-http-data:/data --env-file .env stream-http
#
# The image listens on 0.0.0.0, which the server allows only with sign-in on (GOOGLE_CLIENT_ID,
# GOOGLE_CLIENT_SECRET and an https PUBLIC_URL): without them it refuses to start and says why.
# BASE_IMAGE is any Debian-like image with python3 (3.11 or newer); UV_IMAGE supplies the uv binary,
# which builds the environment and stays out of the image.

ARG BASE_IMAGE=python:3.13-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9

FROM ${UV_IMAGE} AS uv

FROM ${BASE_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /app
COPY pyproject.toml uv.lock ./
# Behind a proxy that inspects TLS, hand the build your CA bundle (it stays out of the image):
#   docker build --secret id=ca-certificates,src=/etc/ssl/certs/ca-certificates.crt .
RUN --mount=type=secret,id=ca-certificates \
    if [ -s /run/secrets/ca-certificates ]; then export SSL_CERT_FILE=/run/secrets/ca-certificates; fi; \
    uv sync --frozen --no-dev --no-install-project --python python3

FROM ${BASE_IMAGE}
COPY --from=build /app/.venv /app/.venv
COPY server.py /app/
# An unprivileged user that owns only its data folder (useradd is not in every minimal base).
RUN echo "app:x:10001:10001:stream-http:/data:/usr/sbin/nologin" >> /etc/passwd \
    && echo "app:x:10001:" >> /etc/group \
    && mkdir -p /data && chown 10001:10001 /data && chmod 700 /data
USER 10001:10001
WORKDIR /app
VOLUME ["/data"]
ENV HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/data \
    LOG_FORMAT=json \
    METRICS_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
# Liveness only: /readyz is for the load balancer, which should stop sending work during a Redis outage
# without the container being restarted for it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/healthz', timeout=4)"]
# SIGTERM, the default stop signal, drains: new requests get 503, calls in flight get SHUTDOWN_GRACE seconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/app/.venv/bin/python", "/app/server.py"]
CMD []
