#!/usr/bin/env bash
# llama.cpp's llama-server built for CUDA, for the GPU of this machine only, from a source tree already here
# (llama.cpp's own, or vendor/llama.cpp of llama-cpp-python's sdist): nothing is downloaded, no web UI.
#   bench/build_llama_server.sh SOURCE_DIR [BUILD_DIR]   ->   BUILD_DIR/bin/llama-server
set -euo pipefail
source_dir=${1:?usage: $0 LLAMA_CPP_SOURCE_DIR [BUILD_DIR]}
build_dir=${2:-build/llama-cuda}
# 9.0 on an H100 or H200 -> 90: one architecture compiles in minutes instead of the default list's tens.
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.[:space:]')
cmake -S "$source_dir" -B "$build_dir" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF
cmake --build "$build_dir" --target llama-server -j "$(nproc)"
"$build_dir/bin/llama-server" --version
