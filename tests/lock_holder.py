"""Another process holding a `pipeline.locks` lock, for tests of what a second job is told."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

HOLD = """
import signal, sys, time
from pipeline import locks
# A process started in the background by a shell without job control (as CI may start the
# tests) inherits SIGINT ignored: without this the holder would sit out its 30 s and be killed,
# leaving an S3 lock behind.
signal.signal(signal.SIGINT, signal.default_int_handler)
location, name, lease_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
try:
    with locks.exclusive(location, name, str, lease_s=lease_s):
        print("held", flush=True)
        time.sleep(600)
except KeyboardInterrupt:  # SIGINT: the lock is given back on the way out
    pass
"""


@contextlib.contextmanager
def lock_held_elsewhere(location: str, name: str, *, lease_s: float = 60.0, env=None):
    """A subprocess holding lock `name` under `location` for the block; yields the Popen.
    The block may kill it (a holder that is gone) or interrupt it (one that ends well)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, location, name, str(lease_s)],
                              cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        line = holder.stdout.readline().strip()
        assert line == "held", f"the lock holder did not start (exit {holder.poll()})"
        yield holder
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGINT)
            try:
                holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
