# The sidecar with a CPU engine: the mock engine (no weights needed), or llama.cpp with
# --build-arg EXTRAS=llamacpp (llama-cpp-python's server, compiled here) and a GGUF file mounted.
# Build from the repository root: docker build -f compose/cpu.Dockerfile -t llm-sidecar-cpu .
FROM python:3.11-slim-bookworm

ARG EXTRAS=""
# A compiler only where llama.cpp is built from source.
RUN if [ -n "$EXTRAS" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends build-essential=12.9 cmake=3.25.1-1 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY pyproject.toml README.md /opt/sidecar-src/
COPY sidecar /opt/sidecar-src/sidecar
COPY engines /opt/sidecar-src/engines
RUN python -m venv /opt/sidecar \
    && /opt/sidecar/bin/pip install --no-cache-dir "/opt/sidecar-src${EXTRAS:+[$EXTRAS]}" \
    && rm -rf /opt/sidecar-src

ENV SIDECAR_HOST=0.0.0.0 \
    SIDECAR_PORT=8000 \
    SIDECAR_LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=5s --start-period=5m --retries=3 \
    CMD ["/opt/sidecar/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
ENTRYPOINT ["/opt/sidecar/bin/sidecar", "serve"]
CMD []
