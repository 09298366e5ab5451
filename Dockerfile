# The fleetbench emulator as a container image (used by ContainerEndpoint, --endpoint container).
#
#   docker build -t fleetbench-emulator .
#   docker run --rm -p 8883:8883 -p 8443:8443 fleetbench-emulator --api-token SECRET
#
# The control plane listens on all interfaces inside the container, so give it an
# --api-token (ContainerEndpoint passes a fresh random one); clients sign with the token
# as secret access key. endpoint.json, the CA and the registry live in /data.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/fleetbench
COPY pyproject.toml README.m[d] ./
COPY harness ./harness
COPY devices ./devices
COPY loadtests ./loadtests
RUN test -f README.md || echo "fleetbench" > README.md \
    && pip install . \
    && useradd --system --create-home --uid 10001 fleetbench \
    && mkdir /data && chown fleetbench /data

USER fleetbench
VOLUME /data
EXPOSE 8883 8443
HEALTHCHECK --interval=2s --timeout=2s --start-period=5s --retries=30 \
    CMD test -f /data/endpoint.json
ENTRYPOINT ["fleetbench", "emulator", "--host", "0.0.0.0", "--api-host", "0.0.0.0", \
            "--mqtt-port", "8883", "--api-port", "8443", "--data-dir", "/data"]
