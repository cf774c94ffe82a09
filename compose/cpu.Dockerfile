# The sidecar with a CPU engine: the mock engine (no weights needed), or llama.cpp with
# --build-arg EXTRAS=llamacpp (llama-cpp-python's server, compiled in the build stage) and a GGUF file mounted.
# Build from the repository root: docker build -f compose/cpu.Dockerfile -t llm-sidecar-cpu .
# BASE_IMAGE: any Debian-based image with python3 and venv (compose/run-pair.sh makes one without a registry).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG EXTRAS=""
# llama.cpp as CI builds it: without the multimodal library (the server does not need it), and for any x86-64
# rather than the build host's CPU, so the image runs wherever it is pulled.
ARG CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"
# A compiler only where llama.cpp is built from source; it stays in this stage.
RUN if [ -n "$EXTRAS" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends build-essential=12.9 cmake=3.25.1-1 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY pyproject.toml README.md /opt/sidecar-src/
COPY sidecar /opt/sidecar-src/sidecar
COPY engines /opt/sidecar-src/engines
RUN python3 -m venv /opt/sidecar \
    && /opt/sidecar/bin/pip install --no-cache-dir "/opt/sidecar-src${EXTRAS:+[$EXTRAS]}"

# The image that runs: the same base, the virtual environment, no compiler.
FROM ${BASE_IMAGE}
ARG EXTRAS=""
# llama.cpp runs its threads on OpenMP, whose runtime comes with the compiler in the build stage.
RUN if [ -n "$EXTRAS" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends libgomp1=12.2.0-14+deb12u1 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/sidecar /opt/sidecar

ENV SIDECAR_HOST=0.0.0.0 \
    SIDECAR_PORT=8000 \
    SIDECAR_LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=5s --start-period=5m --retries=3 \
    CMD ["/opt/sidecar/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
ENTRYPOINT ["/opt/sidecar/bin/sidecar", "serve"]
CMD []
