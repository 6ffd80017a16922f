"""The function every Ray Train worker runs.

Built once, in a fixed order: model, loss, DDP, optimizer, schedule, state restored from the
latest checkpoint. The step is forward on the local sub-batch, loss on the gathered global
batch, backward, optimizer step. Each rank runs exactly `total_steps` steps and calls
`ray.train.report` once per epoch (it is a barrier). Every rank embeds its share of the
evaluation splits; only rank 0 computes the metrics, logs and attaches the checkpoint.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from pipeline.config import config_to_yaml
from pipeline.data.decoding import sub_batch_columns
from pipeline.device_feed import DeviceFeed, autocast_dtype
from pipeline.distributed import mean_across_ranks
from pipeline.learner import MetricLearner
from pipeline.losses import build_loss
from pipeline.models import build_model
from pipeline.reporting.test_embeddings import save_test_embeddings
from pipeline.tracking import UnloggedMetrics, load_unlogged, save_unlogged
from pipeline.training.checkpoint import load_training_state, save_checkpoint
from pipeline.training.eval_shards import EvalSplits
from pipeline.training.evaluate import retrieval_metrics_of, seen_knn_accuracy
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.refresh_link import RefreshLink
from pipeline.training.worker_entry import RunPlan, train_rows

FINAL_FLUSH_S = 10.0
"""How long rank 0 waits for the tracking server to take the run's last metrics; what it does
not take travels in the final checkpoint and the driver resends it."""


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def run_worker(config, plan: RunPlan, rows=None) -> None:
    """One Train worker's whole run (called by `worker_entry.train_loop_per_worker`). `rows`
    is this rank's training stream if the caller already started it, else it starts here."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank = context.get_world_rank()
    _write_pid_if_asked(rank)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config.train.torch_threads)
    autocast = autocast_dtype(device)

    # Same seed on every rank: DDP broadcasts rank 0's weights anyway, and loss parameters
    # must start equal too.
    torch.manual_seed(config.train.seed)
    embedder = build_model(config.model)
    if device.type == "cuda" and config.model.channels_last:
        embedder = embedder.to(memory_format=torch.channels_last)
    loss = build_loss(config.loss, plan.num_classes, config.model.embedding_dim)
    learner = ray.train.torch.prepare_model(MetricLearner(embedder, loss, autocast))
    inner = _unwrap(learner)
    optimizer = build_optimizer(inner.embedder, inner.loss, config.optim, config.loss.lr)
    scheduler = build_scheduler(optimizer, config.optim, plan.total_steps)

    refresh = RefreshLink(plan, rank, device) if plan.refresh_actor else None
    start_step = 0
    carried = UnloggedMetrics()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_training_state(directory)
            if rank == 0:
                # What the dead attempt's rank 0 held when it saved this checkpoint (a tracking
                # outage): its steps are not trained again, so nothing else would send it.
                carried = load_unlogged(directory)
            if refresh is not None and rank == 0:
                refresh.restore(directory)
        inner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]

    logger = None
    if rank == 0:
        from pipeline.tracking import MetricsLogger

        logger = MetricsLogger(plan.tracking_uri, plan.run_id)
        logger.carry_over(carried)
        # Also from step 0: an attempt stopped before its first checkpoint logged steps that
        # this one trains again, into the same MLflow run.
        logger = _NewStepsOnly(logger)
    config_yaml = config_to_yaml(config)
    batches = iter(train_rows(config, plan, rank) if rows is None else rows)
    if start_step < plan.stream_start_step:
        raise RuntimeError(
            f"Ray Train resumed from step {start_step}, but the driver found a checkpoint of step "
            f"{plan.stream_start_step} and planned the data from there"
        )
    # A worker-group restart within the run resumes from a later checkpoint than the one the
    # stream starts at, and Ray Data replays the stream from its start: the plan is shifted by
    # the difference (never short), as it always was before the driver knew the resume step.
    if start_step:
        _emit(plan, rank, {"kind": "text", "text": f"resumed from step {start_step}"})
        if refresh is not None and rank == 0 and config.refresh.lag_steps:
            # Lagged planning reads the index of given steps' weights: the resumed ones are
            # the only weights of this step there will be.
            refresh.publish(start_step, inner)

    eval_splits = EvalSplits.for_run(config.eval, plan)
    feed = DeviceFeed(batches, device, sub_batch_columns, channels_last=config.model.channels_last)
    window = _Window()
    run_start = time.perf_counter()
    for step in range(start_step, plan.total_steps):
        step_start = time.perf_counter()
        loaded = feed.take()
        if loaded is None:
            raise RuntimeError(f"rank {rank}: the data stream ended at step {step} of {plan.total_steps}")
        batch, tensors = loaded

        out = learner(tensors.pop("images"), tensors.pop("labels"), **tensors)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(learner.parameters(), config.optim.grad_clip)
        optimizer.step()
        scheduler.step()

        done = step + 1
        if refresh is not None:
            refresh.after_step(step, batch, out.per_example, inner)
            window.add_index_use(refresh.last_version, refresh.last_staleness)
            if rank == 0 and done < plan.total_steps and (
                done % plan.refresh_every_steps == 0 or refresh.actor_needs_weights()
            ):
                refresh.publish(done, inner)
        if done < plan.total_steps:
            # The next sub-batch crosses to the GPU while this step's backward still runs. After
            # after_step: a planner that follows the model is then held back no further than
            # when each step fetched its own sub-batch.
            feed.prefetch()
        window.add(out.loss.detach(), feed.take_wait_s(), time.perf_counter() - step_start)
        if done % config.train.log_every_steps == 0 or done == plan.total_steps:
            _log_window(window, config, plan, rank, logger, optimizer, done, start_step, run_start, out, device)
            window = _Window()
        if done % plan.steps_per_epoch == 0:
            epoch = done // plan.steps_per_epoch
            last = done == plan.total_steps
            metrics = {"step": done, "epoch": epoch}
            final = None
            if epoch % config.eval.every_epochs == 0 or last:
                evaluated, embedded = _evaluate(
                    inner, config, device, autocast, plan, logger, epoch, done, eval_splits, refresh, rank
                )
                metrics.update(evaluated)
                if last and rank == 0:
                    # The last checkpoint carries what the driver needs to finish the MLflow
                    # record: the test embeddings (plots) and the metrics the server did not
                    # get. The other ranks wait at the report: flush for a bounded time only.
                    final = (embedded, logger.close(timeout_s=FINAL_FLUSH_S))
            _report(metrics, rank, inner, optimizer, scheduler, done, epoch, config_yaml, refresh, plan, logger, final)
            window = _Window()  # evaluation time is not training throughput


WORKER_PID_DIR_ENV = "PIPELINE_WORKER_PID_DIR"
"""When set (fault tests), each rank writes its process id to `<dir>/rank-<rank>.pid`."""


def _write_pid_if_asked(rank: int) -> None:
    directory = os.environ.get(WORKER_PID_DIR_ENV)
    if directory:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"rank-{rank}.pid")
        with open(f"{path}.tmp", "w") as handle:
            handle.write(str(os.getpid()))
        os.replace(f"{path}.tmp", path)  # a reader never sees half a number


class _NewStepsOnly:
    """Rank 0's logger. An attempt before this one (a dead worker group, a stopped job) may have
    logged steps after its last checkpoint (or before the first), which this one trains again;
    a metric is not logged again at a step it already has."""

    def __init__(self, logger):
        self.logger = logger
        try:
            client, run_id = logger.client, logger.run_id
            self.last_step = {
                key: max(m.step for m in client.get_metric_history(run_id, key))
                for key in client.get_run(run_id).data.metrics
            }
        except Exception:  # tracking server unreachable: log everything rather than stop training
            self.last_step = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log the metrics that have no value at `step` yet."""
        from pipeline.tracking import metric_name

        new = {k: v for k, v in metrics.items() if step > self.last_step.get(metric_name(k), -1)}
        if new:
            self.logger.log(new, step)

    def __getattr__(self, name):
        return getattr(self.logger, name)


class _Window:
    """Running sums over one logging interval.

    Losses stay device tensors until the interval is logged: `.item()` every step would make
    the CPU wait for the GPU on every step.
    """

    def __init__(self):
        self.losses: list[torch.Tensor] = []
        self.wait = 0.0
        self.total = 0.0
        self.start = time.perf_counter()
        self.index_versions: list[int] = []
        self.staleness: list[int] = []

    def add(self, loss: torch.Tensor, wait: float, total: float) -> None:
        self.losses.append(loss)
        self.wait += wait
        self.total += total

    def add_index_use(self, version: int, staleness: int) -> None:
        """The cluster-index version this step's sub-batch was planned from, and its age."""
        self.index_versions.append(version)
        self.staleness.append(staleness)


def _log_window(window, config, plan, rank, logger, optimizer, done, start_step, run_start, out, device):
    # Every rank joins the reduction (a collective); only rank 0 writes.
    wait_fraction = mean_across_ranks(window.wait / max(window.total, 1e-9), device)
    if rank != 0:
        return
    elapsed = time.perf_counter() - window.start
    metrics = {
        "train/loss": torch.stack(window.losses).float().mean().item(),
        "train/lr": optimizer.param_groups[0]["lr"],
        "train/images_per_s": len(window.losses) * config.global_batch_size / max(elapsed, 1e-9),
        "train/data_wait_fraction": wait_fraction,
    }
    metrics.update({f"train/{k}": float(v) for k, v in out.stats.items()})
    if window.index_versions:
        # The version rank 0's last step used, and how many steps older than the step its
        # weights were (mean and worst over the interval).
        metrics["refresh/index_version_used"] = window.index_versions[-1]
        metrics["refresh/staleness_steps"] = sum(window.staleness) / len(window.staleness)
        metrics["refresh/staleness_steps_max"] = max(window.staleness)
    logger.log(metrics, done)
    _emit(plan, rank, {
        "kind": "step",
        "epoch": (done - 1) // plan.steps_per_epoch + 1,
        "step": done,
        "start_step": start_step,
        "total_steps": plan.total_steps,
        "loss": metrics["train/loss"],
        "lr": metrics["train/lr"],
        "images_per_s": metrics["train/images_per_s"],
        "data_wait_fraction": wait_fraction,
        "elapsed": time.perf_counter() - run_start,
    })


def _evaluate(inner, config, device, autocast, plan, logger, epoch, done, splits, refresh, rank):
    """Every rank embeds its shares of the evaluation splits; rank 0 computes and logs the
    metrics: (logged metrics, the test split's (embeddings, labels, ids)), ({}, None) elsewhere."""
    start = time.perf_counter()
    # Magnet's own seen-class vote comes from its refresh actor's cluster index (PDDM's actor
    # holds pools, which have no such vote).
    magnet_vote = rank == 0 and refresh is not None and plan.has_seen_holdout and config.loss.name == "magnet"
    if magnet_vote:
        # Magnet inference needs the cluster index of *these* weights: ask for it first, so
        # the actor builds it while the retrieval metrics are computed here.
        refresh.publish(done, inner, confirm=True)
    embedded, gallery, seen = splits.embed(inner.embedder, device, autocast)
    if rank != 0:
        return {}, None
    use_gpu = device.type == "cuda"
    metrics = retrieval_metrics_of(embedded, config.eval, use_gpu, gallery)
    logged = {f"test/{k}": v for k, v in metrics.items()}
    if seen is not None:
        logged["seen/knn_accuracy"] = metrics["seen_knn_accuracy"] = seen_knn_accuracy(
            seen, plan.seen_holdout_ids, config.eval, use_gpu
        )
    if magnet_vote:
        accuracy = refresh.seen_accuracy(done)
        if accuracy is not None:
            logged["seen/magnet_accuracy"] = metrics["seen_magnet_accuracy"] = accuracy
    seconds = time.perf_counter() - start
    logged["test/eval_seconds"] = seconds
    logged["epoch"] = epoch
    logger.log(logged, done)
    shown = {k: v for k, v in metrics.items() if not k.startswith("num_")}
    _emit(plan, 0, {"kind": "eval", "epoch": epoch, "metrics": shown, "seconds": seconds})
    return logged, embedded


def _report(metrics, rank, inner, optimizer, scheduler, done, epoch, config_yaml, refresh, plan, logger,
            final=None) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(
            directory, learner=inner, optimizer=optimizer, scheduler=scheduler,
            step=done, epoch=epoch, config_yaml=config_yaml, metrics=metrics,
            run={"run_name": plan.run_name, "run_id": plan.run_id, "dataset_fingerprint": plan.dataset_fingerprint},
        )
        if refresh is not None:
            refresh.save(directory, done)
        if final is not None:
            (embeddings, labels, ids), unlogged = final
            save_test_embeddings(directory, embeddings, labels, ids)
            save_unlogged(directory, unlogged)
        else:  # what a restarted worker group sends if this process dies (the logger goes on)
            save_unlogged(directory, logger.held())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _emit(plan: RunPlan, rank: int, event: dict) -> None:
    if rank == 0 and plan.progress_queue is not None:
        try:
            plan.progress_queue.put_nowait(event)
        except Exception:  # a full or gone queue must never stop training
            pass
