# The rate limit replica's image: `ratelimit serve`, configured by RATELIMIT_* variables.
#
#   docker build -t envoy-ratelimit-sidecar .
#   docker run --rm -p 8081:8081 -p 9102:9102 -v "$PWD/compose/limits:/etc/ratelimit/limits:ro" \
#     -e RATELIMIT_REDIS_URL=redis://redis-host:6379/0 envoy-ratelimit-sidecar
#
# Runs as an unprivileged user and writes nothing, so a read-only root filesystem works.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/ratelimit \
    PATH=/opt/ratelimit/bin:$PATH

RUN python -m venv /opt/ratelimit \
    && groupadd --system --gid 10001 ratelimit \
    && useradd --system --uid 10001 --gid ratelimit --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ratelimit

WORKDIR /src

# Dependencies first, from setup.cfg alone: this layer is rebuilt only when they change.
COPY setup.cfg pyproject.toml ./
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); \
print(c['options']['install_requires'].strip())" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the package itself, without touching the dependencies installed above.
COPY scripts/healthcheck.py /usr/local/bin/ratelimit-healthcheck
COPY ratelimit ./ratelimit
RUN pip install --no-deps . \
    && chmod 0755 /usr/local/bin/ratelimit-healthcheck \
    && rm -rf /src

# The demo limits, so the image answers out of the box; mount your own over them.
COPY compose/limits /etc/ratelimit/limits

WORKDIR /
# Numeric, so runtimes can verify it is not root (Kubernetes runAsNonRoot).
USER 10001:10001

# Defaults for every flag of `ratelimit serve` come from RATELIMIT_<FLAG> variables.
ENV RATELIMIT_CONFIG=/etc/ratelimit/limits \
    RATELIMIT_REDIS_URL=redis://redis:6379/0 \
    RATELIMIT_GRPC_HOST=0.0.0.0 \
    RATELIMIT_GRPC_PORT=8081 \
    RATELIMIT_METRICS_HOST=0.0.0.0 \
    RATELIMIT_METRICS_PORT=9102

EXPOSE 8081 9102

# gRPC health (grpc.health.v1) of the RateLimitService, at 127.0.0.1:$RATELIMIT_GRPC_PORT.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["ratelimit-healthcheck"]

# Exec form: the server is PID 1 and gets SIGTERM itself (health NOT_SERVING, drain, exit 0).
ENTRYPOINT ["ratelimit"]
CMD ["serve"]
