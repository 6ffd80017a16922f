"""Following the refresh actor from a decode actor: the newest index's tables, polled without
ever waiting for a refresh, and a brake that keeps planning close to training.

Planners whose batches follow the model (Magnet's neighbourhoods, PDDM's hard pools) hold an
`ActorTables` and call `current_tables(step)` for every sub-batch they plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


def lagged_source_step(step: int, lag_steps: int, every_steps: int) -> int:
    """The step whose weights plan training step `step` when planning lags `lag_steps` behind:
    the last refresh step (a multiple of `every_steps`) at or before `step - lag_steps`, and 0
    (the initial model) before the first."""
    return max(0, (step - lag_steps) // every_steps * every_steps) if step >= lag_steps else 0


@dataclass
class ActorTables:
    """The newest planning tables of the refresh actor named `actor_name`.

    Ray Data would plan as far ahead as its buffers allow, which would make every plan stale;
    `current_tables` therefore returns only while `step` is at most `max_ahead_steps` steps
    ahead of the newest step the ranks reported to the actor, waiting otherwise (this waits in
    the decode actor, while training consumes the batches already made).

    With `lag_steps` > 0 (`refresh.lag_steps`) the tables are not the newest but those of the
    index built from the weights of `lagged_source_step(step, ...)`, with the per-example losses
    up to that step: which index plans a step is then fixed by the config, not by when each
    refresh finishes, and the planner waits for that index if it is late.
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
    lag_steps: int = 0
    """0 = plan from the newest index; else plan step s from the index of a fixed earlier step."""
    every_steps: int = 1
    """The run's refresh period in steps (where lagged planning finds its indexes)."""
    lag_wait_s: float = 1800.0
    """Longest wait for a lagged index that has not been built yet; then plan from the newest."""
    _lagged: dict = field(default_factory=dict, init=False, repr=False)
    _tables: object = field(default=None, init=False, repr=False)
    _pending: object = field(default=None, init=False, repr=False)
    _last_poll: float = field(default=0.0, init=False, repr=False)
    _latest_step: int = field(default=0, init=False, repr=False)
    _actor_down: bool = field(default=False, init=False, repr=False)
    _actor: object = field(default=None, init=False, repr=False)

    def __getstate__(self):
        # Pickled to the decode actors by name only; each one looks the actor up itself.
        state = dict(self.__dict__)
        state.update(_tables=None, _pending=None, _last_poll=0.0, _latest_step=0, _actor_down=False, _actor=None,
                     _lagged={})
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
        if self.lag_steps:
            return self._lagged_tables(lagged_source_step(step, self.lag_steps, self.every_steps))
        return self._tables

    def _lagged_tables(self, source_step: int):
        """The tables of the index built from the weights of `source_step`, waiting while it is
        being built; the newest tables if it never will be (the actor restarted, or the run
        resumed past it) or if it is `lag_wait_s` late."""
        import ray

        if source_step in self._lagged:
            return self._lagged[source_step]
        deadline = time.monotonic() + self.lag_wait_s
        while time.monotonic() < deadline:
            try:
                reply = ray.get(self._actor.tables_at.remote(source_step), timeout=max(self.unanswered_s, 10.0))
            except Exception:  # noqa: BLE001 - down or restarting: its new incarnation answers later
                reply = None
            if reply is not None and reply["tables"] is not None:
                # Decode actors plan steps nearly in order: a few recent indexes are enough.
                while len(self._lagged) >= 4:
                    del self._lagged[min(self._lagged)]
                self._lagged[source_step] = reply["tables"]
                return reply["tables"]
            time.sleep(0.05)
        print(f"planner: the index of step {source_step} is {self.lag_wait_s:.0f} s late; planning from the newest")
        self._poll(0.0)
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
