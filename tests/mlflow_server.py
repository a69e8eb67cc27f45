"""A real MLflow tracking server on a free loopback port (the `mlflow server` command of this venv), with a
SQLite store and a local artifact root in a directory: for the tracking tests and the UI screenshot."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(directory: str, start_timeout_s: float = 300) -> Iterator[str]:
    """Start the server, wait until it answers (about 30 s with a new database), yield its URL, stop it."""
    os.makedirs(directory, exist_ok=True)
    url = f"http://127.0.0.1:{free_port()}"
    command = [
        os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
        "--workers", "1", "--backend-store-uri", f"sqlite:///{directory}/mlflow.db",
        "--serve-artifacts", "--artifacts-destination", os.path.join(directory, "artifacts"),
    ]
    # No job runner (GenAI jobs we never use; it costs ~700 MB); a session of its own, to stop every worker at once.
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(os.path.join(directory, "server.log"), "w") as server_log:
        process = subprocess.Popen(command, env=env, stdout=server_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(directory, "server.log")) as f:
                    raise RuntimeError(f"the MLflow server did not start:\n{f.read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # a worker that outlived the server
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
