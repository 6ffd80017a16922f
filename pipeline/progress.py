"""Readable progress of a run: rank 0 sends events, the driver prints one line per event.

Worker output is not forwarded to the driver (Ray's per-process log prefixes and Data's
progress bars would bury it), so rank 0 puts small dicts on a Ray queue and a thread in
the driver formats them.
"""

from __future__ import annotations

import threading
import time


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_event(event: dict) -> str:
    """One line of text for a progress event."""
    kind = event.get("kind")
    if kind == "step":
        done, total = event["step"], event["total_steps"]
        rate = done - event.get("start_step", 0)
        left = event["elapsed"] / rate * (total - done) if rate > 0 else 0.0
        return (
            f"epoch {event['epoch']:>3} step {done:>6}/{total}  loss {event['loss']:.4f}  "
            f"lr {event['lr']:.2e}  {event['images_per_s']:7.1f} img/s  "
            f"data wait {100 * event['data_wait_fraction']:4.1f}%  left {_duration(left)}"
        )
    if kind == "eval":
        parts = "  ".join(f"{k} {v:.4f}" for k, v in event["metrics"].items())
        return f"epoch {event['epoch']:>3} eval  {parts}  ({event['seconds']:.1f}s)"
    return str(event.get("text", event))


class ProgressPrinter:
    """Drains a `ray.util.queue.Queue` in a background thread and prints each event."""

    def __init__(self, queue, printer=print):
        self.queue = queue
        self.printer = printer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                events = self.queue.get_nowait_batch(self.queue.qsize())
            except Exception:
                return
            if not events:
                return
            for event in events:
                self.printer(format_event(event), flush=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain()
            time.sleep(0.5)
