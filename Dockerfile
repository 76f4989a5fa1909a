# The rate limit replica's image: `ratelimit serve`, configured by RATELIMIT_* variables.
#
#   docker build -t envoy-ratelimit-sidecar .
#   docker run --rm -p 8081:8081 -p 9102:9102 -v "$PWD/compose/limits:/etc/ratelimit/limits:ro" \
#     -e RATELIMIT_REDIS_URL=redis://redis-host:6379/0 envoy-ratelimit-sidecar
#
# Two stages: the first builds a virtual environment, the second is the base image plus that
# environment, the health check and the demo limits: no pip, no cache, no compilers.
# Runs as an unprivileged user and writes nothing, so a read-only root filesystem works.
#
# PYTHON_IMAGE: any Debian-based image with python3 and its venv module. The default is the
# official slim image, pinned by digest; refresh it with
#   docker buildx imagetools inspect python:3.11-slim-bookworm
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${PYTHON_IMAGE} AS build

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/src/pip.conf

RUN python3 -m venv /opt/ratelimit

WORKDIR /src

# Dependencies first, from setup.cfg alone: this layer is rebuilt only when they change.
# A .wheelhouse folder in the build context (wheels of the dependencies and of the build
# requirements, e.g. from `pip download`) makes the build work without a network: pip then
# installs from it alone (pip.conf); without one, pip uses its package index.
COPY setup.cfg pyproject.toml .wheelhous[e] ./
RUN if ls ./*.whl >/dev/null 2>&1; then printf '[global]\nno-index = true\nfind-links = /src\n' > pip.conf; fi \
    && python3 -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); \
print(c['options']['install_requires'].strip())" > requirements.txt \
    && /opt/ratelimit/bin/pip install -r requirements.txt

# Then the package itself, without touching the dependencies installed above. pip and
# setuptools leave the environment: the final stage gets no build tools.
COPY ratelimit ./ratelimit
RUN /opt/ratelimit/bin/pip install --no-deps . \
    && /opt/ratelimit/bin/pip uninstall --yes --quiet setuptools pip

COPY scripts/healthcheck.py /opt/ratelimit/bin/ratelimit-healthcheck
RUN chmod 0755 /opt/ratelimit/bin/ratelimit-healthcheck


FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/ratelimit \
    PATH=/opt/ratelimit/bin:$PATH

RUN groupadd --system --gid 10001 ratelimit \
    && useradd --system --uid 10001 --gid ratelimit --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ratelimit

COPY --from=build /opt/ratelimit /opt/ratelimit

# The demo limits, so the image answers out of the box; mount your own over them.
COPY compose/limits /etc/ratelimit/limits

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
