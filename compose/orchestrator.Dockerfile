# The orchestrator of the compose pair: loads the model through the control plane, sends one chat request.
# Build from the repository root: docker build -f compose/orchestrator.Dockerfile -t llm-sidecar-orchestrator .
# BASE_IMAGE: any image with python3 and pip (compose/run-pair.sh makes one without a registry).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

RUN python3 -m pip install --no-cache-dir httpx==0.28.1 structlog==25.4.0
COPY compose/orchestrator.py /opt/orchestrator.py
USER 65534:65534
ENTRYPOINT ["python3", "/opt/orchestrator.py"]
