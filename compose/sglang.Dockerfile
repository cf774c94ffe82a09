# The sidecar on SGLang's official image, as the container's entry point: it starts
# `python3 -m sglang.launch_server` itself on load.
# Build from the repository root: docker build -f compose/sglang.Dockerfile -t llm-sidecar-sglang .
# BASE_IMAGE and UV_IMAGE: the same images from a registry mirror or a local build.
ARG BASE_IMAGE=lmsysorg/sglang:v0.5.12
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5
FROM ${UV_IMAGE} AS uv

FROM ${BASE_IMAGE}

# The sidecar gets a virtual environment of its own, so its dependencies never change the engine's; with its
# OpenTelemetry exporter (the otel extra), idle until an OTLP endpoint is set.
COPY --from=uv /uv /usr/local/bin/uv
COPY pyproject.toml README.md /opt/sidecar-src/
COPY sidecar /opt/sidecar-src/sidecar
COPY engines /opt/sidecar-src/engines
RUN uv venv --python 3.12 /opt/sidecar \
    && uv pip install --no-cache --python /opt/sidecar/bin/python "/opt/sidecar-src[otel]" \
    && rm -rf /opt/sidecar-src

# SGLang lives in the image's own python3, not in the sidecar's environment.
ENV SIDECAR_ENGINE_EXECUTABLES='{"sglang": "python3"}' \
    SIDECAR_HOST=0.0.0.0 \
    SIDECAR_PORT=8000 \
    SIDECAR_LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=15m --retries=3 \
    CMD ["/opt/sidecar/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
ENTRYPOINT ["/opt/sidecar/bin/sidecar", "serve"]
CMD []
