# syntax=docker/dockerfile:1
# Millstream edge agent (and its fleet simulator). Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t millstream-agent .
# The same image runs on a Raspberry Pi (python:*-slim is multi-arch: amd64, arm64, armv7).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY edge-agent/ edge-agent/
RUN python -m venv /opt/millstream \
    && /opt/millstream/bin/pip install ./edge-agent

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="millstream-agent" \
      org.opencontainers.image.source="https://github.com/millstream/millstream" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/millstream/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10002 millstream \
    && useradd --system --uid 10002 --gid millstream --home-dir /var/lib/millstream --shell /usr/sbin/nologin millstream \
    && mkdir -p /var/lib/millstream \
    && chown millstream:millstream /var/lib/millstream
COPY --from=build /opt/millstream /opt/millstream
USER 10002:10002
WORKDIR /var/lib/millstream
VOLUME ["/var/lib/millstream"]
ENTRYPOINT ["millstream-agent"]
CMD ["run", "--config", "/etc/millstream/agent.yaml"]
