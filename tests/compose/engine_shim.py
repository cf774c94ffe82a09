"""Stands in for an engine's CLI outside its image: records the command the sidecar ran, then runs the mock
engine on the host and port that command gave, under the model name it served.

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


def main() -> None:
    engine, argv = sys.argv[1], sys.argv[2:]
    with open(os.environ["SHIM_LOG"], "a") as log:
        log.write(json.dumps({"engine": engine, "argv": argv}) + "\n")
    if engine == "vllm":
        model, host = argv[1], _flag(argv, "--host")
    elif engine == "sglang":
        model, host = _flag(argv, "--model-path"), _flag(argv, "--host")
    else:
        model, host = _flag(argv, "--model-id"), _flag(argv, "--hostname")
    served = _flag(argv, "--served-model-name") if "--served-model-name" in argv else model
    mock = [sys.executable, "-m", "engines.mock_server", "--host", host, "--port", _flag(argv, "--port")]
    os.execv(sys.executable, [*mock, "--model", served])


if __name__ == "__main__":
    main()
