"""Following the refresh actor from a decode actor: the newest index's tables, polled without
ever waiting for a refresh, and a brake that keeps planning close to training.

Planners whose batches follow the model (Magnet's neighbourhoods, PDDM's hard pools) hold an
`ActorTables` and call `current_tables(step)` for every sub-batch they plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class ActorTables:
    """The newest planning tables of the refresh actor named `actor_name`.

    Ray Data would plan as far ahead as its buffers allow, which would make every plan stale;
    `current_tables` therefore returns only while `step` is at most `max_ahead_steps` steps
    ahead of the newest step the ranks reported to the actor, waiting otherwise (this waits in
    the decode actor, while training consumes the batches already made).
    """

    actor_name: str
    max_ahead_steps: int = 8
    poll_seconds: float = 0.5
    """How often to ask the refresh actor for newer tables (or newer seed weights)."""
    first_index_timeout_s: float = 1800.0
    """How long the very first plan waits for the initial index (embedding the whole set)."""
    max_wait_s: float = 120.0
    """Longest wait for training to catch up; then plan anyway (never a deadlock)."""
    unanswered_s: float = 2.0
    """A request unanswered this long means the actor is down (restarting): stop holding back."""
    _tables: object = field(default=None, init=False, repr=False)
    _pending: object = field(default=None, init=False, repr=False)
    _last_poll: float = field(default=0.0, init=False, repr=False)
    _latest_step: int = field(default=0, init=False, repr=False)
    _actor_down: bool = field(default=False, init=False, repr=False)
    _actor: object = field(default=None, init=False, repr=False)

    def __getstate__(self):
        # Pickled to the decode actors by name only; each one looks the actor up itself.
        state = dict(self.__dict__)
        state.update(_tables=None, _pending=None, _last_poll=0.0, _latest_step=0, _actor_down=False, _actor=None)
        return state

    def current_tables(self, step: int = 0):
        """The newest tables received, for planning training step `step`. Blocks until the very
        first index exists, and while `step` is too far ahead of training."""
        import ray

        if self._actor is None:
            self._actor = ray.get_actor(self.actor_name)
        if self._tables is None:
            reply = ray.get(self._actor.plan_tables.remote(-1, -1, -1, True), timeout=self.first_index_timeout_s)
            self._accept(reply)
            self._last_poll = time.monotonic()
        deadline = time.monotonic() + self.max_wait_s
        self._poll(self.poll_seconds)
        # Holding back relies on the actor hearing the ranks' steps. While it is down, or
        # restarted and not yet told (their reports to the dead incarnation are lost), plan
        # on: otherwise training would wait for plans that wait for training.
        while (
            step > self._latest_step + self.max_ahead_steps
            and not self._actor_down
            and time.monotonic() < deadline
        ):
            # Training is behind: check for its progress often, without spinning.
            time.sleep(0.02)
            self._poll(0.1)
        return self._tables

    def _poll(self, interval: float) -> None:
        """Take a finished reply if there is one and ask again when `interval` has passed
        since the last request; never blocks."""
        import ray

        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                try:
                    self._accept(ray.get(self._pending))
                except Exception:  # noqa: BLE001 - the actor died or is restarting: keep the last plan
                    self._actor_down = True
                self._pending = None
            elif time.monotonic() - self._last_poll > self.unanswered_s:
                self._actor_down = True
        if self._pending is None and time.monotonic() - self._last_poll >= interval:
            self._request()

    def _request(self) -> None:
        self._last_poll = time.monotonic()
        t = self._tables
        version, tag, stamp = (-1, -1, -1) if t is None else (t.version, t.tag, getattr(t, "weights_stamp", -1))
        self._pending = self._actor.plan_tables.remote(version, tag, stamp, False)

    def _accept(self, reply: dict) -> None:
        # A restarted actor reports step 0 until the ranks report again: keep the maximum,
        # and count the actor as down until it has caught up.
        self._actor_down = reply["latest_step"] < self._latest_step
        self._latest_step = max(self._latest_step, reply["latest_step"])
        if reply["tables"] is not None:
            self._tables = reply["tables"]
        elif reply["weights"] is not None and self._tables is not None:
            tag, weights, stamp = reply["weights"]
            if tag == self._tables.tag:
                self._tables.weights, self._tables.weights_stamp = weights, stamp
