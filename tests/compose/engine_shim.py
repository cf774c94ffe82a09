"""Stands in for an engine's CLI outside its image: records the command the sidecar ran, then runs the mock
engine on the host and port that command gave, under the model name it served, guarded by the key the sidecar
gave the engine where that engine takes it.

    engine_shim.py vllm serve MODEL --host H --port P [...]
    engine_shim.py sglang -m sglang.launch_server --model-path MODEL --host H --port P [...]
    engine_shim.py tgi --model-id MODEL --hostname H --port P [...]
"""

from __future__ import annotations

import json
import os
import sys


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# Where each engine takes its key: a variable, or SGLang's --api-key.
_KEY_VARIABLE = {"vllm": "VLLM_API_KEY", "tgi": "API_KEY"}


def main() -> None:
    engine, argv = sys.argv[1], sys.argv[2:]
    key = _flag(argv, "--api-key") if engine == "sglang" else os.environ.get(_KEY_VARIABLE[engine])
    with open(os.environ["SHIM_LOG"], "a") as log:
        log.write(json.dumps({"engine": engine, "argv": argv, "key_given": key is not None}) + "\n")
    if engine == "vllm":
        model, host = argv[1], _flag(argv, "--host")
    elif engine == "sglang":
        model, host = _flag(argv, "--model-path"), _flag(argv, "--host")
    else:
        model, host = _flag(argv, "--model-id"), _flag(argv, "--hostname")
    served = _flag(argv, "--served-model-name") if "--served-model-name" in argv else model
    mock = [sys.executable, "-m", "engines.mock_server", "--host", host, "--port", _flag(argv, "--port")]
    os.execv(sys.executable, [*mock, "--model", served] + (["--api-key", key] if key is not None else []))


if __name__ == "__main__":
    main()
