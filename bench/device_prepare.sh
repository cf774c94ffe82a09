#!/usr/bin/env bash
# What bench/device_checks.sh needs on the GPU machine that its image lacks, gathered here (that machine reaches no
# registry): the sidecar's dependencies as wheels for its Python (3.12) in .whl/, the project itself as a wheel
# (its entry points name the engines), and Debian's nginx with the libraries it links in .nginx/. Both folders are
# ignored by git (.git/info/exclude) and travel as the device tool's `carry`: [".whl", ".nginx"].
#
#   bash bench/device_prepare.sh [PYTHON]     # PYTHON: the project's venv (default .venv/bin/python), for versions
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.venv/bin/python}

for folder in .whl .nginx; do
  grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >>.git/info/exclude
  rm -rf "$folder" && mkdir -p "$folder"
done

# The versions the suite runs with here. What the machine's image already holds (aiohttp, psutil, numpy,
# matplotlib, tqdm, prometheus-client, nvidia-ml-py, uvloop, torch) is used as it is there.
wanted=(starlette uvicorn httptools orjson pydantic pydantic_core pydantic-settings python-dotenv structlog
  annotated-types typing-inspection typing_extensions anyio httpx httpcore h11)
pins=()
for name in "${wanted[@]}"; do
  version=$("$python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "$name is not installed in $python's environment" >&2; exit 1; }
  pins+=("$name==$version")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"
"$python" -m pip wheel --quiet --no-deps -w .whl .

# nginx as the bench's reference, with the libraries it links but the C library's own (the machine has those).
binary=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$binary" ] || { echo "nginx is not installed here: apt-get install nginx-light" >&2; exit 1; }
mkdir -p .nginx/lib
cp "$binary" .nginx/nginx
ldd "$binary" | awk '$3 ~ /^\// {print $3}' | grep -vE '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' \
  | xargs -r cp -t .nginx/lib
# Those libraries for nginx alone: Python's own ssl module there keeps the machine's OpenSSL.
cat >.nginx/run <<'SCRIPT'
#!/bin/sh
here=$(dirname "$0")
LD_LIBRARY_PATH="$here/lib" exec "$here/nginx" "$@"
SCRIPT
chmod +x .nginx/run

du -sh .whl .nginx
