"""Start-up and shutdown of the real servers the tests run (mlflow server, moto_server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def wait_until_up(process: subprocess.Popen, url: str, log_path: Path, name: str,
                  seconds: float) -> None:
    """Poll `url` until it answers 200; kill the process and raise with its log's tail if it
    exits or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{name} did not start: {Path(log_path).read_text()[-2000:]}")
        time.sleep(0.3)


def stop(process: subprocess.Popen) -> None:
    """Terminate, then kill if it has not exited within 20 s."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServerProcess:
    """`mlflow server` on a fixed loopback port and store, which can be stopped and restarted."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the server and wait until it answers /health."""
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the child holds it open
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root}/mlflow.db",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MLFLOW_TRACKING_URI": ""},
        )
        log.close()
        # A loaded 2-core machine can take minutes.
        wait_until_up(self.process, f"{self.uri}/health", self.root / "server.log",
                      "mlflow server", 300)

    def stop(self) -> None:
        """Stop the server (its port then refuses connections)."""
        if self.process is not None and self.process.poll() is None:
            stop(self.process)
            self.process.wait()
        self.process = None
