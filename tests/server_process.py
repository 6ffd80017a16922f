"""Start-up and shutdown of the real servers the tests run (mlflow server, moto_server)."""

from __future__ import annotations

import subprocess
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
