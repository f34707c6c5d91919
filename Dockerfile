# delegate-agent image: a slim Python base, dependencies from the pinned set, a fixed non-root user.
#
# The delegate handles SIGTERM itself (it drains, reports and deregisters), so it runs directly as
# PID 1 without an init. The runtime image has no compiler, no pip cache and no source tree.
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY constraints.txt pyproject.toml README.md ./
COPY agent ./agent
# Only runtime dependencies (no demo, no test tools), each at the version in constraints.txt.
RUN python3 -m venv /opt/delegate-agent \
 && /opt/delegate-agent/bin/python -m pip install --constraint constraints.txt pip setuptools \
 && PIP_CONSTRAINT=constraints.txt /opt/delegate-agent/bin/python -m pip install --constraint constraints.txt . \
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
