#!/usr/bin/env bash
# llama.cpp's own server, llama-server, built for the CPU (any x86-64), for tests/llamacpp/test_llama_server.py:
# the engine an operator runs from llama.cpp's images, where the rest of the suite runs llama-cpp-python's.
#   bench/install_llama_server.sh [DEST]   ->   DEST/bin/llama-server   (default .llama-server; 5 to 7 min on 2 cores)
# The source is the llama.cpp that llama-cpp-python vendors, of the version in .venv (pip's cache has its sdist
# from that install; PYTHON names another interpreter with pip), so the two engines the suite runs are one
# llama.cpp. One static binary, no web UI, nothing fetched at build time. A DEST already built from that version
# is kept; a binary built before on this machine is taken from the user's cache (as pip keeps the wheel it built
# for llama-cpp-python), $LLAMA_SERVER_CACHE or ~/.cache/llm-sidecar.
set -euo pipefail
dest=${1:-.llama-server}
python=${PYTHON:-.venv/bin/python}
version=${LLAMA_CPP_PYTHON_VERSION:-$("$python" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')}
cached=${LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-sidecar}/llama-server-$version
if [ -x "$dest/bin/llama-server" ] && [ "$(cat "$dest/version" 2>/dev/null)" = "$version" ]; then
  echo "llama-server from llama-cpp-python $version already in $dest"
  exit 0
fi
if [ -x "$cached" ]; then
  mkdir -p "$dest/bin"
  cp "$cached" "$dest/bin/llama-server"
  echo "$version" >"$dest/version"
  echo "llama-server from llama-cpp-python $version, built before on this machine ($cached), in $dest"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" "llama-cpp-python==$version"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
if ! command -v cmake >/dev/null; then  # a machine without it: PyPI's, as llama-cpp-python's own build takes it
  python3 -m venv "$work/tools"
  "$work/tools/bin/python" -m pip install --quiet cmake ninja
  PATH="$work/tools/bin:$PATH"
fi
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$work"/llama_cpp_python-*/vendor/llama.cpp -B "$work/build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF >/dev/null
cmake --build "$work/build" --target llama-server -j "$(nproc)" >/dev/null
mkdir -p "$dest/bin" "$(dirname "$cached")"
cp "$work/build/bin/llama-server" "$dest/bin/llama-server"
cp "$work/build/bin/llama-server" "$cached.part" && mv "$cached.part" "$cached"
echo "$version" >"$dest/version"
"$dest/bin/llama-server" --version 2>&1 | grep -m1 version
