"""Start `first-gguf serve` on a free loopback port (shared by the server and web-page tests)."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("first-gguf"))
KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(gguf, *, threads: int = 2, n_ctx: int = 2048, api_key: str = KEY):
    """Yield the base URL of a server for ``gguf`` (None: the default model); it is stopped on exit."""
    port = free_port()
    model = [] if gguf is None else ["--model", str(gguf)]  # None: the default model with its shipped routers
    proc = subprocess.Popen([CLI, "serve", *model, "--port", str(port), "--api-key", api_key,
                             "--threads", str(threads), "--n-ctx", str(n_ctx)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # 401: up
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            proc.kill()
        if proc.poll() is not None:
            pytest.fail(proc.stdout.read().decode()[-2000:])
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
