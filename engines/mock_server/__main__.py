"""`python -m engines.mock_server`: the mock engine as its own process, with knobs for tests and benchmarks."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from types import FrameType

import uvicorn

from engines.mock_server.app import MockConfig, create_app
from engines.mock_server.gpu import GpuMemory


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mock-engine", description="OpenAI-compatible mock LLM engine.")
    parser.add_argument("--model", default="mock-model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="time to first token")
    parser.add_argument("--itl-ms", type=float, default=5.0, help="time between tokens")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer (max_tokens caps it)")
    parser.add_argument("--startup-delay-s", type=float, default=0.0, help="wait before listening")
    parser.add_argument("--exit-at-start", type=int, help="print an error and exit with this code at start-up")
    parser.add_argument("--ignore-sigterm", action="store_true", help="only SIGKILL stops it")
    parser.add_argument("--spawn-child", action="store_true", help="start a child process in the same group")
    parser.add_argument("--print-env", action="append", default=[], help="print this variable's value at start")
    parser.add_argument("--gpu-mb", type=float, default=0.0, help="hold this much GPU memory (needs PyTorch, a GPU)")
    # vLLM's flags of the same names: a hosted engine's key and TLS.
    parser.add_argument("--api-key", help="/v1 routes need 'Authorization: Bearer KEY' (else $VLLM_API_KEY's)")
    parser.add_argument("--max-num-seqs", type=int, help="at most this many requests generate; the rest wait")
    parser.add_argument("--ssl-keyfile", help="serve https with this key")
    parser.add_argument("--ssl-certfile", help="serve https with this certificate (chain)")
    # vLLM's: each serves its endpoints only with the variable vLLM needs for them (VLLM_SERVER_DEV_MODE=1,
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), so that tests see the sidecar set it.
    parser.add_argument("--enable-sleep-mode", action="store_true", help="POST /sleep?level=N, /wake_up")
    parser.add_argument("--enable-lora", action="store_true", help="POST /v1/load_lora_adapter, unload")
    return parser


def main() -> None:
    args = _parser().parse_args()
    # The mock engine writes its output as an engine would: plain lines on stdout and stderr.
    out = sys.stdout
    for name in args.print_env:
        out.write(f"mock engine sees {name}={os.environ.get(name, '')}\n")
    out.flush()
    if args.exit_at_start is not None:
        sys.stderr.write(f"mock engine: fatal: cannot start with these arguments (exit {args.exit_at_start})\n")
        raise SystemExit(args.exit_at_start)
    if args.spawn_child:
        # A grandchild of the sidecar, as vLLM's workers are: it must die with the group.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        out.write(f"mock engine started child pid={child.pid}\n")
        out.flush()
    weights = GpuMemory()  # referenced until the server returns: PyTorch frees what nothing refers to
    if args.gpu_mb:
        weights.hold(args.gpu_mb)  # as an engine holds its weights and KV cache while it runs
        out.write(f"mock engine holds {args.gpu_mb} MB of GPU memory\n")
        out.flush()
    if args.startup_delay_s:
        time.sleep(args.startup_delay_s)
    config = MockConfig(
        model=args.model,
        ttft_s=args.ttft_ms / 1000,
        itl_s=args.itl_ms / 1000,
        tokens=args.tokens,
        api_key=args.api_key or os.environ.get("VLLM_API_KEY") or None,  # as vLLM: the flag first, then the variable
        max_num_seqs=args.max_num_seqs,
        sleep_mode=args.enable_sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1",
        runtime_lora=args.enable_lora
        and os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("true", "1"),
        weights=weights,
        weights_mb=args.gpu_mb,
    )
    server = _StubbornServer if args.ignore_sigterm else uvicorn.Server
    server(
        uvicorn.Config(
            create_app(config),
            host=args.host,
            port=args.port,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_level="warning",
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
        )
    ).run()


class _StubbornServer(uvicorn.Server):
    """An engine that ignores SIGTERM (as a hung one would): only SIGKILL stops it."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM:
            super().handle_exit(sig, frame)


if __name__ == "__main__":
    main()
