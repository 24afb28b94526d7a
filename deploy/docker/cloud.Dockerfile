# syntax=docker/dockerfile:1
# Millstream cloud service. Build from the repository root:
#   docker build -f deploy/docker/cloud.Dockerfile -t millstream-cloud .
# Two stages: wheels are built with pip in the first, only the installed packages reach
# the second (no compiler, no pip cache). Runs as an unprivileged user.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY cloud-service/ cloud-service/
RUN python -m venv /opt/millstream \
    && /opt/millstream/bin/pip install ./cloud-service

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="millstream-cloud" \
      org.opencontainers.image.source="https://github.com/millstream/millstream" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/millstream/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 millstream \
    && useradd --system --uid 10001 --gid millstream --home-dir /data --shell /usr/sbin/nologin millstream \
    && mkdir -p /data \
    && chown millstream:millstream /data
COPY --from=build /opt/millstream /opt/millstream
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["millstream-cloud"]
CMD ["serve", "--data-dir", "/data", "--host", "0.0.0.0"]
