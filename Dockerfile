# delegate-agent image: a slim Python base, dependencies from the pinned set, a fixed non-root user.
#
# The delegate handles SIGTERM itself (it drains, reports and deregisters), so it runs directly as
# PID 1 without an init. The runtime image has no compiler, no pip cache and no source tree.
#
# The base is pinned by digest, since a tag can be moved and a digest cannot: the multi-platform
# index of Docker Hub's python:3.11-slim-bookworm (Python 3.11.16) as public Dockerfiles pinned it in
# autumn 2026 (one notes it was cross-checked against docker-library/repo-info on 2026-09-22); no
# registry is reachable from where this was written. To refresh (or verify) it, read the tag's index
# digest with `skopeo inspect --format '{{.Digest}}' docker://docker.io/library/python:3.11-slim-bookworm`
# (or `docker buildx imagetools inspect`) and replace it below. PYTHON_IMAGE=... builds on another
# base (tools/image-check.sh passes the one it builds locally).
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY constraints.txt pyproject.toml README.md ./
COPY agent ./agent
# Only runtime dependencies (no demo, no test tools): the part of constraints.txt above its
# RUNTIME_END line, each file checked against its sha256 (pip and setuptools too). The project has
# no hash: it is installed without dependencies and built with that setuptools, not a fetched one.
RUN sed '/^# RUNTIME_END/,$d' constraints.txt > /tmp/runtime.txt \
 && python3 -m venv /opt/delegate-agent \
 && /opt/delegate-agent/bin/python -m pip install --require-hashes --no-deps -r /tmp/runtime.txt \
 && /opt/delegate-agent/bin/python -m pip install --no-deps --no-build-isolation . \
 && /opt/delegate-agent/bin/python -m pip check \
 && /opt/delegate-agent/bin/python -m pip uninstall --yes pip setuptools \
 && find /opt/delegate-agent -name '__pycache__' -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="delegate-agent" \
      org.opencontainers.image.description="A delegate that validates AWS connectors from inside your cluster" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/delegate-agent"
# uid/gid 10001: fixed, so runAsUser/fsGroup and file permissions are predictable.
RUN groupadd --gid 10001 delegate \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin delegate \
 && mkdir -p /var/lib/delegate-agent \
 && chown 10001:10001 /var/lib/delegate-agent
COPY --from=build /opt/delegate-agent /opt/delegate-agent
ENV PATH=/opt/delegate-agent/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AGENT_DATA_DIR=/var/lib/delegate-agent \
    AGENT_HTTP_LISTEN=0.0.0.0:3460 \
    AGENT_LOG_FORMAT=json
USER 10001:10001
WORKDIR /var/lib/delegate-agent
EXPOSE 3460
STOPSIGNAL SIGTERM
ENTRYPOINT ["delegate-agent", "run"]
