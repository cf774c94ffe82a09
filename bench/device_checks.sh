#!/usr/bin/env bash
# The checks that need the 16-core GPU machine, in one call of the device tool (about 7 minutes there), after
# bench/device_prepare.sh has gathered what that machine lacks:
#
#   run(command="bash bench/device_checks.sh", carry=[".whl", ".nginx"], timeout_s=600)
#
# 1. `bench.gpu_check` with the sidecar on its defaults (data-plane workers from the cores): the GPU memory a
#    request, a sleep, a wake and an unload free or take, read by the sidecar, against what the mock allocated.
# 2. `python -m bench` with the sidecar on its defaults, beside nginx: the 16-core figures (the fast engine in 4
#    processes, the load in 5, so that neither is what gets measured).
# 3. One worker against the default count at 1 and 1024 streams: the TTFT one stream gets with N workers against
#    one, and how the relayed chunks scale.
# Each step has its own time limit, so one that hangs leaves the others their time. Results and the log go to $OUT
# (the device tool brings them back): gpu_check.json, defaults/results.json and .png, workers/scaling.json, log.txt.
# PYTHON and DEVICE_CHECKS_QUICK=1 (short phases, no GPU check without nvidia-smi) try the script elsewhere.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/device-checks}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ -d .whl ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
nginx=off
if [ -x .nginx/run ] && .nginx/run -v; then
  nginx=$PWD/.nginx/run  # nginx with the libraries carried beside it
fi
auto=$("$python" -c 'from sidecar.settings import auto_workers, usable_cores; print(auto_workers(usable_cores()))') \
  || exit 1
"$python" -c 'import platform; print(platform.python_version(), platform.platform())'
echo "cores $(nproc), workers the sidecar's default gives: $auto"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

if [ "${DEVICE_CHECKS_QUICK:-}" = 1 ]; then
  phases=(--concurrency 1,32 --rounds 1 --seconds 1)
  scaling=(--concurrency 1,32 --rounds 1 --seconds 1)
else
  phases=(--rounds 2)
  scaling=(--concurrency 1,1024 --rounds 2 --no-cost-split)
fi
load=(--engine-workers 4 --load-processes 5 --skip-memory --nginx "$nginx")
failed=()

echo "== 1. GPU readings with the sidecar on its defaults"
if command -v nvidia-smi >/dev/null; then
  timeout 120 "$python" -m bench.gpu_check --workers auto --out "$out/gpu_check.json" || failed+=(gpu_check)
else
  echo "no nvidia-smi: no GPU check"
fi

echo "== 2. python -m bench, the sidecar on its defaults"
timeout 270 "$python" -m bench "${phases[@]}" "${load[@]}" --out "$out/defaults" || failed+=(defaults)

echo "== 3. one worker against the default count"
timeout 200 "$python" -m bench --workers "1,$auto" "${scaling[@]}" "${load[@]}" --out "$out/workers" \
  || failed+=(workers)

if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all done"
