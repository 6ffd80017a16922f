"""`scripts/setup.sh`, the first step of both README commands: a Python outside 3.10-3.12 is
named before a virtual environment or an install is started."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"


@pytest.mark.parametrize(
    ("python", "says"),
    [
        ("fake", "is Python 3.13.1; this project needs Python 3.10-3.12: name one, e.g. PYTHON=python3.12 bash"),
        ("no-such-python3", "no-such-python3: no such command; this project needs Python 3.10-3.12"),
    ],
)
def test_an_unsupported_python_is_refused_before_anything_is_made(tmp_path, python, says):
    (tmp_path / "scripts").mkdir()
    shutil.copy(SETUP, tmp_path / "scripts" / "setup.sh")
    if python == "fake":  # answers --version as a 3.13 would; any other use fails
        python = tmp_path / "python3.13"
        python.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.13.1" && exit 0\nexit 1\n')
        python.chmod(0o755)
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHON": str(python)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and says in done.stderr
    assert not (tmp_path / ".venv").exists()
