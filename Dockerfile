# syntax=docker/dockerfile:1
# The smtp2api container image (docs/deployment.md). Build and run:
#   docker build -t smtp2api .                       (add --build-arg EXTRAS=ses,graph for those providers)
#   docker run -v ./config.toml:/etc/smtp2api/config.toml:ro --env-file secrets.env \
#     -v smtp2api-spool:/var/lib/smtp2api -p 587:2587 -p 9025:9025 smtp2api
# Pinned base: Python 3.12.8 on Debian 12 slim, by tag and (multi-arch index) digest; rebase both together.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm@sha256:2199a62885a12290dc9c5be3ca0681d367576ab7bf037da120e564723292a2f0

# --- build: a virtualenv with smtp2api and its dependencies, nothing else ---------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/smtp2api
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# Optional provider extras from pyproject.toml, comma separated: "ses", "graph", "ses,graph".
ARG EXTRAS=""
RUN /opt/smtp2api/bin/pip install "/src${EXTRAS:+[$EXTRAS]}" \
 && /opt/smtp2api/bin/python -m compileall -q /opt/smtp2api

# --- runtime: the virtualenv on a clean base, as an unprivileged user -------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/smtp2api/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SMTP2API_CONFIG=/etc/smtp2api/config.toml \
    SMTP2API_HTTP__LISTEN=0.0.0.0:9025
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it and volumes can be chowned.
RUN groupadd --system --gid 10025 smtp2api \
 && useradd --system --uid 10025 --gid 10025 --home-dir /var/lib/smtp2api --no-create-home \
      --shell /usr/sbin/nologin smtp2api \
 && install -d -o 10025 -g 10025 -m 0700 /var/lib/smtp2api \
 && install -d -m 0755 /etc/smtp2api
COPY --from=build /opt/smtp2api /opt/smtp2api
# A safe default that delivers to files under the spool volume: mount your own config over it.
COPY deploy/docker/config.toml /etc/smtp2api/config.toml
WORKDIR /var/lib/smtp2api
VOLUME ["/var/lib/smtp2api"]
# 2525/2587 plain+STARTTLS, 2465 implicit TLS (unprivileged; publish them as 25/587/465), 9025 ops.
EXPOSE 2525 2587 2465 9025
USER 10025:10025
# /healthz answers 200 while the process serves (the ops port comes from SMTP2API_HTTP__LISTEN).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; port = os.environ.get('SMTP2API_HTTP__LISTEN', ':9025').rsplit(':', 1)[1]; u.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
# SIGTERM drains sessions in DATA (delivery.shutdown_timeout); give docker stop that long.
STOPSIGNAL SIGTERM
ENTRYPOINT ["smtp2api"]
CMD ["serve"]
