"""nginx as the reference proxy the bench measures beside the sidecar: one worker, no buffering, upstream keep-alive.

The bench writes its configuration and runs it in the foreground from a work directory; nothing of the system's
nginx configuration is read. The temporary directories nginx was built with are created first, so a binary
unpacked from its package (`dpkg -x`) runs too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import psutil

from bench.processes import wait_ok
from sidecar.control.engine import free_port

CONFIG = """\
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid {workdir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    upstream engine {{
        server 127.0.0.1:{engine_port};
        keepalive 1024;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        keepalive_requests 100000;
        client_max_body_size 64m;
        location = /nginx-health {{ return 200 "ok"; }}
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def find_nginx(choice: str) -> str | None:
    """`auto`: nginx on PATH (or /usr/sbin), else None; `off`: None; else the path given."""
    if choice == "off":
        return None
    if choice != "auto":
        return choice
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def _make_temp_paths(binary: str) -> None:
    built_with = subprocess.run([binary, "-V"], capture_output=True, text=True, check=True).stderr
    for path in re.findall(r"--http-[a-z]+-temp-path=(\S+)", built_with):
        Path(path).mkdir(parents=True, exist_ok=True)


def start_nginx(binary: str, engine_port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """nginx in front of the engine on a free loopback port: the master process and its URL."""
    workdir = workdir / "nginx"
    workdir.mkdir(parents=True, exist_ok=True)
    _make_temp_paths(binary)
    port = free_port()
    config = workdir / "nginx.conf"
    config.write_text(CONFIG.format(workdir=workdir, engine_port=engine_port, port=port))
    with (workdir / "nginx.log").open("wb") as log:
        argv = [binary, "-p", str(workdir), "-c", str(config), "-e", "stderr"]
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ok(url + "/nginx-health", timeout_s=20)
    return process, url


def worker_pid(master: subprocess.Popen[bytes]) -> int:
    """The one worker's pid: it does the proxying, so it is the process whose CPU the bench measures."""
    children = psutil.Process(master.pid).children()
    if len(children) != 1:
        raise RuntimeError(f"expected one nginx worker, found {len(children)}")
    return children[0].pid
