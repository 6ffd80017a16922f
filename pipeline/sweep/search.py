"""The sweep file as Ray Tune sees it: the param space, the search algorithm and ASHA.

Per-loss settings are sampled only for their loss. Grid and random search (Tune's own
variant generator) run every loss as one branch of a grid, `num_samples` times each;
HyperOpt samples the loss as a conditional choice whose branches hold that loss's space;
Optuna asks for the loss first, then for that loss's settings (a define-by-run space).
Either way a trial's params flatten to config settings with `space.trial_settings`.
"""

from __future__ import annotations

import math

from pipeline.sweep.space import Dimension, SweepError, SweepSpec

LOSS_BRANCH = "per_loss"
"""Key of the per-loss branch in grid, random and HyperOpt params."""


def _tune_domain(dim: Dimension, grid: bool):
    from ray import tune

    values = list(dim.values)
    if dim.kind == "constant":
        return values[0]
    if dim.kind == "grid" or (dim.kind == "choice" and grid):
        return tune.grid_search(values)
    if dim.kind == "choice":
        return tune.choice(values)
    if dim.kind == "uniform":
        return tune.uniform(*values)
    if dim.kind == "loguniform":
        return tune.loguniform(*values)
    return tune.randint(*values)


def basic_param_space(spec: SweepSpec) -> dict:
    """Tune param space for grid and random search: a grid over the losses, each branch with
    its own settings; `choice` becomes a grid in a grid search."""
    from ray import tune

    grid = spec.search == "grid"
    branches = [
        {"loss.name": loss, **{k: _tune_domain(d, grid) for k, d in dims.items()}}
        for loss, dims in spec.losses.items()
    ]
    return {LOSS_BRANCH: tune.grid_search(branches), **{k: _tune_domain(d, grid) for k, d in spec.space.items()}}


def planned_trials(spec: SweepSpec) -> int:
    """How many trials the sweep runs in all: `num_samples` for a searcher; for grid and random
    search, `num_samples` at every point of `basic_param_space`'s grid (the shared grid times
    the sum of the losses' own grids)."""
    if spec.search not in ("grid", "random"):
        return spec.num_samples
    grid = spec.search == "grid"

    def points(dims: dict[str, Dimension]) -> int:
        return math.prod(len(d.values) for d in dims.values() if d.kind == "grid" or (grid and d.kind == "choice"))

    return spec.num_samples * points(spec.space) * sum(points(dims) for dims in spec.losses.values())


class OptunaSpace:
    """Optuna's define-by-run space: the loss first, then the shared settings and only that
    loss's own (named `<loss>/<key>`, so two losses never share a distribution's name)."""

    def __init__(self, spec: SweepSpec):
        self.shared = spec.space
        self.losses = spec.losses

    def __call__(self, trial) -> dict:
        loss = trial.suggest_categorical("loss.name", list(self.losses))
        constants = {}
        for prefix, dims in (("", self.shared), (f"{loss}/", self.losses[loss])):
            for key, dim in dims.items():
                name = prefix + key
                low_high = list(dim.values)
                if dim.kind == "constant":
                    constants[name] = low_high[0]
                elif dim.kind == "choice":
                    trial.suggest_categorical(name, low_high)
                elif dim.kind == "uniform":
                    trial.suggest_float(name, *low_high)
                elif dim.kind == "loguniform":
                    trial.suggest_float(name, *low_high, log=True)
                else:  # randint: upper bound excluded, as in Tune
                    trial.suggest_int(name, low_high[0], low_high[1] - 1)
        return constants


def _hyperopt_space(spec: SweepSpec) -> dict:
    from hyperopt import hp

    def domain(dim: Dimension, label: str):
        values = list(dim.values)
        if dim.kind == "constant":
            return values[0]
        if dim.kind == "choice":
            return hp.choice(label, values)
        if dim.kind == "uniform":
            return hp.uniform(label, *values)
        if dim.kind == "loguniform":
            return hp.loguniform(label, math.log(values[0]), math.log(values[1]))
        return hp.randint(label, *values)

    branches = [
        {"loss.name": loss, **{k: domain(d, f"{loss}/{k}") for k, d in dims.items()}}
        for loss, dims in spec.losses.items()
    ]
    return {LOSS_BRANCH: hp.choice("loss.name", branches), **{k: domain(d, k) for k, d in spec.space.items()}}


def _require(package: str, search: str, path: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise SweepError(
            f"{path}: search: {search} needs the {package} package, which is not installed: "
            f"pip install -e '.[sweep]' in the clone (or pip install {package})"
        ) from err


def check_search_available(spec: SweepSpec) -> None:
    """Raise, before anything starts, when the search needs a package that is missing."""
    if spec.search == "optuna":
        _require("optuna", spec.search, spec.path)
    elif spec.search == "hyperopt":
        _require("hyperopt", spec.search, spec.path)


def build_search(spec: SweepSpec, concurrency: int):
    """(param_space, search_alg) for the Tuner, running at most `concurrency` trials at once:
    Tune's variant generator with the param space for grid and random search, or a searcher
    that holds its own space."""
    check_search_available(spec)
    if spec.search in ("grid", "random"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # TuneConfig.max_concurrent_trials ignores a generator passed in: it takes its own.
        generator = BasicVariantGenerator(random_state=spec.seed, max_concurrent=concurrency)
        return basic_param_space(spec), generator
    from ray.tune.search import ConcurrencyLimiter

    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(space=OptunaSpace(spec), metric=spec.metric, mode=spec.mode, seed=spec.seed)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(
            space=_hyperopt_space(spec), metric=spec.metric, mode=spec.mode, random_state_seed=spec.seed
        )
    return None, ConcurrencyLimiter(searcher, max_concurrent=concurrency)


def build_scheduler(spec: SweepSpec, final_epoch: int):
    """ASHA on the sweep metric, with rungs at `grace_period` x `reduction_factor`^k epochs
    before `final_epoch` (Tune's default FIFO scheduler when the file turns ASHA off).

    No rung sits at a trial's last epoch and a trial that passed every rung is never stopped
    (`stop_last_trials=False`): a trial Tune stops is killed at once, and one that trained
    every epoch must live on to log its model and close its MLflow run.
    """
    if spec.asha is None:
        return None
    from pipeline.sweep.asha import ResumableASHA

    return ResumableASHA(
        time_attr="epoch",
        max_t=final_epoch - 1,
        grace_period=spec.asha.grace_period,
        reduction_factor=spec.asha.reduction_factor,
        stop_last_trials=False,
    )
