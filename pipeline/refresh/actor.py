"""The refresh actor: one per training run, re-embedding the full training set and rebuilding
the index its batches are planned from while training goes on.

Rank 0 publishes its weights (`publish_weights`, an object-store reference) every
`refresh.every_steps` steps; a background thread inside the actor picks up the newest
weights, embeds every training image (eval preprocessing; the decoded images are kept as far
as `refresh.cache_max_mb` allows, the rest decoded again at each refresh), builds the
index with faiss - Magnet's per-class k-means and impostor table, or PDDM's hard-negative
pools (sampler `hard_pools`) - and swaps it in. The decode actors' planners poll
`plan_tables` without blocking; every rank reports its steps and per-example losses with
`record_losses` (fire-and-forget); Magnet's seed weights come from those losses. Nothing in
training ever waits for a refresh, except the very first index, built from the initial model
before step 1.

If the actor dies, Ray restarts it (`max_restarts`); the new incarnation tells rank 0 (through
the replies to `record_losses`) that it needs weights, and rebuilds the index from the latest
ones while the planners go on with the last tables they hold.

With `refresh.lag_steps` > 0 (lagged planning) the actor builds every published step's index,
in step order, keeps the recent ones, and serves each with the seed weights of the per-example
losses recorded up to its step (`tables_at`): which batches a step gets then follows from the
config and seed alone, not from when each refresh finished.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import fields

import numpy as np

from pipeline.data.decoding import PrefixCache
from pipeline.data.neighbourhoods import PlanTables
from pipeline.data.pool_batches import PoolTables
from pipeline.refresh.cluster_index import (
    ClusterIndex,
    ClusterLosses,
    build_cluster_index,
    cluster_seed_weights,
)
from pipeline.refresh.hard_pools import HardPoolIndex, build_hard_pools


def refresh_actor_name(run_name: str) -> str:
    """The name workers and decode actors look the refresh actor up by."""
    return f"dml-refresh-{run_name}"


class RefreshActor:
    """Holds the cluster index and the per-example losses of one run (a threaded Ray actor)."""

    def __init__(self, config_dict: dict, store, holdout_ids: np.ndarray, run_id: str = "", tracking_uri: str = "",
                 resume_state: dict | None = None):
        """config_dict: the run's resolved config; store: the training split's EncodedImageStore;
        holdout_ids: ids held out of training (embedded for the seen-class accuracy only);
        resume_state: the index and losses of the checkpoint a resumed run starts from (then
        no index is built from the initial model)."""
        import ray

        from pipeline.config import config_from_dict

        self.config = config_from_dict(config_dict)
        self.pools = self.config.sampler.name == "hard_pools"
        """Whether this run's index is the hard-negative pools (else Magnet's clusters)."""
        self.store = store
        self.holdout_ids = np.asarray(holdout_ids, dtype=np.int64)
        self.num_examples = len(store)
        self.incarnation = uuid.uuid4().hex[:8]
        self.reconstructed = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.logger = None
        if run_id and tracking_uri:
            from pipeline.tracking import MetricsLogger

            self.logger = MetricsLogger(tracking_uri, run_id)

        self.cond = threading.Condition()
        self.index: ClusterIndex | HardPoolIndex | None = None
        self.version = 0
        self.example_loss = np.full(self.num_examples, np.nan, dtype=np.float32)
        self.loss_stamp = 0
        self._weights_cache: tuple[int, int, np.ndarray] | None = None  # (version, loss_stamp, weights)
        self._cluster_losses: tuple[int, ClusterLosses] | None = None  # (index version, its loss totals)
        # Weights waiting for a refresh, (step, weights ref, sigma2, min_version) in step order:
        # only the newest one, or with lagged planning every one.
        self.pending: list[tuple[int, object, float, int]] = []
        self.building = False
        self.building_step: int | None = None
        self.lag = int(self.config.refresh.lag_steps)
        self.num_ranks = int(self.config.train.num_workers)
        # Lagged planning: the indexes built so far by model step, their tables (with the seed
        # weights of the losses up to their step), the losses not yet folded into
        # `locked_loss`, and the newest step each rank reported.
        self.built: dict[int, ClusterIndex | HardPoolIndex] = {}
        self.lagged_tables: dict[int, PlanTables | PoolTables] = {}
        self.loss_log: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        self.locked_loss = self.example_loss.copy()
        self.rank_steps: dict[int, int] = {}
        self.rank_base_step = 0
        self.latest_step = 0
        self.seen_accuracy: dict[int, float] = {}
        self.history: list[dict] = []
        self.error: str | None = None
        self.fatal: str | None = None
        """Why the refresh thread has ended (its model did not build): no index will come, and
        a restored one would never be refreshed, so planners are failed rather than served."""
        self._images = PrefixCache(self.config.refresh.cache_max_mb * 2**20)
        self.restored_step: int | None = None
        if not self.reconstructed:
            if resume_state is not None:
                # A resumed run: go on from the checkpoint's index and losses.
                with self.cond:
                    self._adopt(resume_state)
                self._log_restored()
            else:
                # The first index comes from the initial model, which every rank builds identically.
                self.pending = [(0, None, 1.0, 0)]
        self.thread = threading.Thread(target=self._serve, name="refresh", daemon=True)
        self.thread.start()

    # ---- calls from training ----------------------------------------------------------

    def publish_weights(self, step: int, weights: list, sigma2: float = 1.0, min_version: int = 0) -> None:
        """Rank 0's weights at `step` (`weights` = [ObjectRef of the state_dict], wrapped in a
        list so Ray does not fetch it into this call). Replaces any not yet started, unless
        planning is lagged: then every step's weights are built, once each."""
        entry = (int(step), weights[0], float(sigma2), int(min_version))
        with self.cond:
            if self.fatal is not None:  # nothing would build it: do not hold its weights
                return
            if not self.lag:
                if not self.pending or step >= self.pending[-1][0]:
                    self.pending = [entry]
            elif step not in self.built and step != self.building_step and all(p[0] != step for p in self.pending):
                self.pending = sorted([*self.pending, entry], key=lambda p: p[0])
            self.cond.notify_all()

    def record_losses(self, step: int, ids: np.ndarray, losses: np.ndarray, index_version: int = 0,
                      rank: int = 0) -> dict:
        """Per-example losses of a trained sub-batch of rank `rank`, reported as of `step` and
        planned from index `index_version`; the reply tells rank 0 whether we need weights
        (after a restart)."""
        ids = np.asarray(ids, dtype=np.int64)
        losses = np.asarray(losses, dtype=np.float32)
        with self.cond:
            self._note_version_in_use(index_version)
            # An id twice in one sub-batch keeps its last loss (in the totals and in the losses).
            last = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]
            ids, losses = ids[last], losses[last]
            totals = self._cluster_losses
            if totals is not None and self.index is not None and totals[0] == self.index.version:
                totals[1].replace(ids, self.example_loss[ids], losses)
            self.example_loss[ids] = losses
            self.loss_stamp += 1
            self.latest_step = max(self.latest_step, int(step))
            if self.lag:
                self.rank_steps[int(rank)] = max(self.rank_steps.get(int(rank), 0), int(step))
                if len(ids) and not self.pools:
                    self.loss_log.append((int(step), int(rank), ids, losses))
                # No notify: nothing waits for losses (planners poll `tables_at`).
            return {
                "incarnation": self.incarnation,
                "needs_weights": self.index is None and not self.pending,
                "version": self.version,
            }

    def plan_tables(self, have_version: int, have_tag: int, have_stamp: int, wait: bool) -> dict:
        """What a planner holding index (`have_version`, `have_tag`) and seed weights
        `have_stamp` lacks: `tables` (a whole PlanTables) when the index changed (by tag),
        `weights` = (tag, weights, stamp) when only the
        seed weights did, and always `latest_step`, the newest step a rank reported. With
        `wait`, blocks until the first index exists."""
        with self.cond:
            self._note_version_in_use(have_version)
            if wait:
                while self.index is None and self.error is None:
                    self.cond.wait(timeout=1.0)
            self._raise_if_fatal()
            if self.error is not None and self.index is None:
                raise RuntimeError(f"the refresh actor could not build an index: {self.error}")
            reply = {"tables": None, "weights": None, "latest_step": self.latest_step}
            if self.index is None:
                return reply
            index = self.index
            if self.pools:
                if index.tag != have_tag:
                    reply["tables"] = PoolTables(
                        version=index.version, model_step=index.model_step, tag=index.tag,
                        classes=index.classes, members=index.members, offsets=index.offsets,
                    )
                return reply
            weights = self._seed_weights()
            stamp = self.loss_stamp
        if index.tag != have_tag:
            reply["tables"] = self._tables_of(index, weights, stamp)
        elif stamp != have_stamp:
            reply["weights"] = (index.tag, weights, stamp)
        return reply

    def tables_at(self, step: int) -> dict:
        """Lagged planning: `tables` of the index built from the weights of `step`, with the
        seed weights of the losses the ranks reported up to `step`; None while that index is
        being built or awaited, or those losses have not all arrived (ask again).

        An index that will never be built (the actor restarted, or the run resumed, after
        `step`) is replaced by the first one built after it, the same one in every such run,
        `exact` False; by the newest one if none is built or coming (a refresh failed)."""
        with self.cond:
            self._raise_if_fatal()
            if self.error is not None and self.index is None:
                raise RuntimeError(f"the refresh actor could not build an index: {self.error}")
            if step in self.built:
                return {"tables": self._lagged_tables_upto(step), "exact": True}
            queued = [p[0] for p in self.pending] + ([self.building_step] if self.building else [])
            known = [*self.built, *queued]
            if (
                self.index is None
                or step in queued
                # Not published yet: training has not got there. Rank 0 publishes a step's
                # weights right after that step, well before any rank reports two steps later.
                or (step > max(known, default=-1) and step >= self.latest_step - 1 and self.error is None)
            ):
                return {"tables": None, "exact": True}
            later = min((s for s in known if s > step), default=None)
            if later is not None:
                tables = self._lagged_tables_upto(later) if later in self.built else None
                return {"tables": tables, "exact": False}
            weights = None if self.pools else self._seed_weights()
            return {"tables": self._tables_of(self.index, weights, self.loss_stamp), "exact": False}

    def _raise_if_fatal(self) -> None:
        # Under the lock.
        if self.fatal is not None:
            raise RuntimeError(f"the refresh actor cannot refresh its index: {self.fatal}")

    def _lagged_tables_upto(self, step: int):
        # Under the lock. Fixes the tables of every built index up to `step` in step order, each
        # with the losses reported up to its own step; None until every rank has reported
        # `step` (losses travel a step late and fire-and-forget).
        if step in self.lagged_tables:
            return self.lagged_tables[step]
        if not self.pools and min(self.rank_steps.get(r, self.rank_base_step) for r in range(self.num_ranks)) < step:
            return None
        magnet = self.config.loss.magnet
        for built_step in sorted(s for s in self.built if s <= step and s not in self.lagged_tables):
            index = self.built[built_step]
            weights = None
            if not self.pools:
                # In (step, rank) order, so an example two ranks trained on ends the same way.
                due = sorted((r for r in self.loss_log if r[0] <= built_step), key=lambda r: (r[0], r[1]))
                self.loss_log = [r for r in self.loss_log if r[0] > built_step]
                for _, _, ids, losses in due:
                    self.locked_loss[ids] = losses
                weights = cluster_seed_weights(self.locked_loss, index.assignment, index.num_clusters,
                                               magnet.seed_floor)
            self.lagged_tables[built_step] = self._tables_of(index, weights, built_step)
        return self.lagged_tables[step]

    def _tables_of(self, index, weights, stamp):
        """What planners read of `index`: PoolTables, or PlanTables with seed `weights`."""
        if self.pools:
            return PoolTables(
                version=index.version, model_step=index.model_step, tag=index.tag,
                classes=index.classes, members=index.members, offsets=index.offsets,
            )
        return PlanTables(
            version=index.version, model_step=index.model_step, tag=index.tag, members=index.members,
            offsets=index.offsets, cluster_class=index.cluster_class, impostors=index.impostors,
            weights=weights, weights_stamp=stamp,
        )

    def wait_for_index(self, min_step: int, timeout_s: float = 600.0) -> dict | None:
        """Block until an index built from weights of step >= `min_step` exists; its summary.
        None if it cannot come: no such weights are being built or waiting, or time is up."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.index is None or self.index.model_step < min_step:
                left = deadline - time.monotonic()
                coming = self.building or any(p[0] >= min_step for p in self.pending)
                if left <= 0 or self.error is not None or not coming:
                    return None
                self.cond.wait(timeout=min(left, 1.0))
            index = self.index
        return {
            "version": index.version,
            "model_step": index.model_step,
            "seen_accuracy": self.seen_accuracy.get(index.version),
        }

    def status(self) -> dict:
        """Counters and the timing of every refresh so far (for tests and benchmarks)."""
        with self.cond:
            return {
                "incarnation": self.incarnation,
                "reconstructed": self.reconstructed,
                "version": self.version,
                "model_step": None if self.index is None else self.index.model_step,
                "num_clusters": getattr(self.index, "num_clusters", None),
                "latest_step": self.latest_step,
                "restored_step": self.restored_step,
                "refreshes": len(self.history),
                "history": list(self.history),
                "error": self.error,
            }

    def close_metrics(self, timeout_s: float = 60.0) -> list[str]:
        """Send the refresh metrics still queued (for at most `timeout_s`) and log no more; one
        line per metric MLflow did not get. Called by the driver when training has ended, before
        it kills the actor, which would take the unsent metrics with it."""
        logger, self.logger = self.logger, None
        return [] if logger is None else logger.close(timeout_s=timeout_s).describe()

    def get_state(self) -> dict | None:
        """Index and losses as plain arrays, saved with each checkpoint."""
        with self.cond:
            if self.index is None:
                return None
            # The index's own arrays, not copies (asdict's): an index is never changed once built.
            # A Magnet index leaves out its centroids (K x D: 180 MB at 90k clusters of 512-d),
            # which only the refresh that builds an index reads, for its seen-class vote.
            index = {f.name: getattr(self.index, f.name) for f in fields(self.index) if f.name != "centroids"}
            return {"index": index, "example_loss": self.example_loss.copy(), "version": self.version}

    def restore(self, state: dict) -> bool:
        """Adopt a checkpoint's state if it is newer than ours (a resumed run); True if adopted."""
        with self.cond:
            if self.index is not None and self.index.model_step >= int(state["index"]["model_step"]):
                return False
            self._adopt(state)
        self._log_restored()
        return True

    def _adopt(self, state: dict) -> None:
        # Under the lock (or in __init__). A fresh version and tag: the planners may hold the
        # saved index under its old number from before, and must see this one as new.
        if self.pools:
            index = HardPoolIndex(**state["index"])
        else:  # checkpoints since 2026-12-07 hold no centroids (get_state)
            index = ClusterIndex(**{"centroids": np.zeros((0, 0), np.float32), **state["index"]})
        self.version = max(self.version, int(state["version"])) + 1
        index.version = self.version
        index.tag = int.from_bytes(os.urandom(4), "little") >> 1
        self.index = index
        self.restored_step = index.model_step
        # Training resumes at the checkpoint's step: the planners hold back relative to it.
        self.latest_step = max(self.latest_step, int(state.get("step", index.model_step)))
        # A copy: arrays that come through the object store are read-only, and record_losses
        # writes into this one (a read-only one failed every call and stalled the planners).
        loss = np.array(state["example_loss"], dtype=np.float32)
        if len(loss) == self.num_examples:
            self.example_loss = loss
            self.locked_loss = loss.copy()
            self.loss_stamp += 1
            self._cluster_losses = None
        # Losses of steps before the checkpoint will not be reported again.
        self.rank_base_step = max(self.rank_base_step, self.latest_step)
        self.cond.notify_all()

    def _log_restored(self) -> None:
        if self.logger is not None and self.restored_step is not None:
            try:
                self.logger.log({"refresh/restored_step": self.restored_step, "refresh/version": self.version},
                                self.restored_step)
            except Exception as err:  # noqa: BLE001 - logging must not stop the actor
                print(f"refresh actor: could not log to MLflow: {err}")

    # ---- the refresh thread -------------------------------------------------------------

    def _serve(self) -> None:
        import ray
        import torch

        from pipeline.device_feed import granted_device
        from pipeline.models import build_model

        torch.set_num_threads(max(1, int(self.config.refresh.num_cpus)))
        device = granted_device(ray.get_gpu_ids(), torch.cuda.is_available())  # refresh.num_gpus
        torch.manual_seed(self.config.train.seed)
        try:
            model = build_model(self.config.model).to(device).eval()
        except Exception as err:  # noqa: BLE001 - planners wait for a first index: say why none comes
            import traceback

            with self.cond:
                self.error = self.fatal = f"building the model: {type(err).__name__}: {err}"
                self.pending.clear()
                self.cond.notify_all()
            traceback.print_exc()
            return
        while True:
            with self.cond:
                while not self.pending:
                    self.cond.wait()
                step, ref, sigma2, min_version = self.pending.pop(0)
                self.building = True
                self.building_step = step
                start_step = self.latest_step
            try:
                self._refresh(model, device, step, ref, sigma2, min_version, start_step)
                if device.type == "cuda":  # hand its search blocks back to the worker on this GPU
                    torch.cuda.empty_cache()
            except Exception as err:  # noqa: BLE001 - keep serving the last index; report why
                import traceback

                with self.cond:
                    self.error = f"{type(err).__name__}: {err}"
                    self.cond.notify_all()
                traceback.print_exc()
            finally:
                with self.cond:
                    self.building = False
                    self.building_step = None
                    self.cond.notify_all()

    def _refresh(self, model, device, step, ref, sigma2, min_version, start_step) -> None:
        import ray

        started = time.time()
        t0 = time.perf_counter()
        if ref is not None:
            model.load_state_dict(ray.get(ref))
        embeddings = self._embed_all(model, device)
        embed_seconds = time.perf_counter() - t0

        with self.cond:
            version = max(self.version, min_version) + 1
        index, index_seconds, accuracy = self._build_index(embeddings, version, step, sigma2, device)
        if self.lag:
            # Cluster ids carry the tag, and the loss orders clusters by id: a tag drawn from the
            # step keeps lagged runs identical (steps, like random tags, tell indexes apart).
            index.tag = int(np.random.default_rng([self.config.train.seed, step, 7]).integers(2**31))
        with self.cond:
            if self.lag:
                self.built[step] = index
                # Planners run at most lag + max_plan_ahead steps behind the newest publication.
                keep = (self.lag + self.config.refresh.max_plan_ahead_steps) // max(1, self.config.refresh.every_steps) + 3
                for old in sorted(self.built)[:-keep]:
                    self.built.pop(old)
                    self.lagged_tables.pop(old, None)
            if self.index is not None and self.index.model_step > step:
                # A checkpoint's newer index was restored while this one was being built (or,
                # lagged, a later step's weights arrived and were built first).
                self.cond.notify_all()
                return
            if version <= self.version:  # renumber: a restore took this number meanwhile
                version = index.version = self.version + 1
            self.version = version
            self.index = index
            self.error = None
            if accuracy is not None:
                self.seen_accuracy[version] = accuracy
            record = {
                "version": version, "model_step": step, "started": started, "finished": time.time(),
                "embed_seconds": embed_seconds, "index_seconds": index_seconds,
                "steps_during": self.latest_step - start_step, "seen_accuracy": accuracy,
            }
            if self.pools:
                record["pool_distance_mean"] = float(index.distances.mean()) if len(index.distances) else 0.0
            else:
                record["num_clusters"] = index.num_clusters
            self.history.append(record)
            # Queued (never blocks) before the index is announced: whoever sees the index, the
            # driver closing the actor's metrics included, finds its metrics queued.
            self._log(record)
            self.cond.notify_all()

    def _build_index(self, embeddings, version, step, sigma2, device):
        """(index, seconds, seen-class accuracy or None) of this run's kind: the hard-negative
        pools, or Magnet's cluster index and its soft nearest-cluster accuracy on the hold-out."""
        import torch

        labels = self.store.labels.copy()
        labels[self.holdout_ids] = -1
        use_gpu = device.type == "cuda"  # faiss-gpu, or torch's search where faiss has no GPU
        if self.pools:
            index, seconds = build_hard_pools(
                embeddings, labels, self.config.sampler.pool_size, version=version, model_step=step, use_gpu=use_gpu,
                index_description=self.config.refresh.pool_index, search_params=self.config.refresh.pool_search_params,
            )
            return index, seconds, None
        magnet = self.config.loss.magnet
        index, seconds = build_cluster_index(
            embeddings, labels, clusters_per_class=magnet.clusters_per_class,
            num_impostors=magnet.clusters_per_neighbourhood - 1, version=version, model_step=step,
            seed=self.config.train.seed, use_gpu=use_gpu,
            # Lagged runs vary k-means by the step: version numbers depend on restarts.
            seed_round=step if self.lag else None,
        )
        accuracy = None
        if len(self.holdout_ids):
            from pipeline.losses.magnet import magnet_class_predictions

            predicted = magnet_class_predictions(
                torch.from_numpy(embeddings[self.holdout_ids]), torch.from_numpy(index.centroids),
                torch.from_numpy(index.cluster_class), sigma2, len(self.store.classes), L=magnet.nearest_clusters,
            )
            accuracy = float((predicted.numpy() == self.store.labels[self.holdout_ids]).mean())
        return index, seconds, accuracy

    def _embed_all(self, model, device) -> np.ndarray:
        """Embeddings [N, dim] float32 of every id of the split (eval preprocessing)."""
        import torch

        from pipeline.device_feed import autocast_dtype, embed_rows

        autocast = autocast_dtype(device)
        with torch.inference_mode():
            return np.concatenate([
                out for _, out in embed_rows(model, self._image_batches(), device, lambda images: images, autocast)
            ])

    def _image_batches(self):
        """Decoded eval-size uint8 batches in id order; after the first pass, as many of the
        first ones as fit in `refresh.cache_max_mb` are replayed from memory, and only the rest
        decoded again (the eval transform is deterministic)."""
        yield from self._images.batches(self._decode_from)

    def _decode_from(self, start_batch: int):
        from pipeline.data.decoding import decode_rgb, decoded_batches, eval_transform

        data = self.config.data
        transform = eval_transform(data.image_size, data.eval_resize)
        encoded = self.store.encoded_images()

        def decode(i: int) -> np.ndarray:
            return transform(decode_rgb(encoded(i))).numpy()

        # As many decode threads as the CPUs the actor holds (as its torch threads).
        threads = max(1, int(self.config.refresh.num_cpus))
        batch_size = self.config.refresh.batch_size
        yield from decoded_batches(decode, self.num_examples, batch_size, threads, start=start_batch * batch_size)

    def _note_version_in_use(self, version: int) -> None:
        # Called under the lock. A restarted actor starts counting at 0, but the planners and
        # ranks still hold the old incarnation's versions, and a version number must never
        # name two different indexes (cluster ids carry it). Jump past any version seen.
        if self.index is None or version > self.index.version:
            self.version = max(self.version, int(version))

    def _seed_weights(self) -> np.ndarray:
        # Called under the lock. Cached per (index version, loss stamp); from loss totals that
        # record_losses keeps up to date, summed over every example once per index.
        cached = self._weights_cache
        if cached is not None and cached[0] == self.index.version and cached[1] == self.loss_stamp:
            return cached[2]
        totals = self._cluster_losses
        if totals is None or totals[0] != self.index.version:
            totals = (self.index.version,
                      ClusterLosses(self.example_loss, self.index.assignment, self.index.num_clusters))
            self._cluster_losses = totals
        weights = totals[1].seed_weights(self.config.loss.magnet.seed_floor)
        self._weights_cache = (self.index.version, self.loss_stamp, weights)
        return weights

    def _log(self, record: dict) -> None:
        logger = self.logger  # `close_metrics` may take it away meanwhile
        if logger is None:
            return
        metrics = {
            "refresh/count": len(self.history),
            "refresh/version": record["version"],
            "refresh/model_step": record["model_step"],
            "refresh/embed_seconds": record["embed_seconds"],
            "refresh/steps_during": record["steps_during"],
            "refresh/reconstructed": float(self.reconstructed),
        }
        if self.pools:
            metrics["refresh/knn_seconds"] = record["index_seconds"]
            metrics["refresh/pool_distance_mean"] = record["pool_distance_mean"]
        else:
            metrics["refresh/cluster_seconds"] = record["index_seconds"]
            metrics["refresh/num_clusters"] = record["num_clusters"]
        if record["seen_accuracy"] is not None:
            metrics["refresh/seen_magnet_accuracy"] = record["seen_accuracy"]
        try:
            logger.log(metrics, record["model_step"])
        except Exception as err:  # noqa: BLE001 - a busy tracking store must not stop refreshes
            print(f"refresh actor: could not log to MLflow: {err}")
