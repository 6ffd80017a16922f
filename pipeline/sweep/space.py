"""The sweep file: a YAML search space over losses and their parameters, read and checked
against the config tree before anything runs.

    name: seeds-vs-baselines      # names the Tune experiment and the MLflow parent run
    preset: local                 # base config: a preset name or a YAML path
    fixed: {train.epochs: 6}      # settings every trial shares
    metric: test/recall@1         # what the search and ASHA optimise: a test/* metric
    mode: max
    search: random                # grid | random | optuna | hyperopt
    num_samples: 2
    asha: {grace_period: 2, reduction_factor: 2}     # or false
    max_failures: 1               # retries of a trial whose driver died (e.g. its node was lost)
    space:                        # sampled for every trial
      optim.lr: {loguniform: [3e-4, 3e-3]}
    losses:                       # loss name -> its own space, sampled only for that loss
      triplet: {loss.triplet.margin: {uniform: [0.1, 0.3]}}
      magnet: {sampler.name: neighbourhoods}

Keys are config paths (`python -m jobs.train --help-config`). A value is a constant or one of
`choice`, `grid`, `uniform`, `loguniform`, `randint` (upper bound excluded).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, ConfigError, load_config, parse_yaml

SEARCHES = ("grid", "random", "optuna", "hyperopt")
SAMPLED_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
RANGE_KINDS = ("uniform", "loguniform", "randint")
TRIAL_DRIVER_CPUS = 1.0
"""CPUs of a trial's driver function (Tune's default); its Ray Data reads run there too."""
COMBINATIONS_CHECKED = 1024
"""Most configs per loss that `candidate_configs` builds to check every combination of the
swept settings' candidates. Each costs a config build (~10 ms) there and the runner's dataset
check (up to ~5 ms, Magnet's planner), so about 15 s per loss at most; a grid that large runs
more trials than a sweep waits for, and a random search samples little of such a space. A
larger space gets every pair of settings instead: a value clashes with another setting's (as
refresh.lag_steps with refresh.max_plan_ahead_steps), and pairs grow with the square of the
settings, not with their product."""


class SweepError(ValueError):
    """A sweep file that cannot run: the message names the file and the field."""


@dataclass(frozen=True)
class Dimension:
    """One swept setting: a constant, a list to choose from, or a numeric range."""

    key: str
    kind: str
    """constant, choice, grid, uniform, loguniform or randint."""
    values: tuple
    """The value (constant), the values (choice, grid) or the (low, high) bounds."""

    @property
    def sampled(self) -> bool:
        """Whether trials differ in this setting."""
        return self.kind != "constant"

    def describe(self) -> str:
        """Readable form, e.g. `loguniform(0.0003, 0.003)` (parent-run params, plots)."""
        if self.kind == "constant":
            return repr(self.values[0])
        return f"{self.kind}({', '.join(map(repr, self.values))})"

    def candidates(self) -> list:
        """Values that bound what a trial can get: every listed value, or a range's ends."""
        if self.kind == "randint":  # [low, low + 1) holds one value
            return sorted({self.values[0], self.values[1] - 1})
        return list(self.values)


@dataclass(frozen=True)
class AshaSettings:
    """ASHA early stopping on the sweep metric, in epochs."""

    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass
class SweepSpec:
    """A parsed, structurally checked sweep file."""

    path: str
    text: str
    name: str
    preset: str
    metric: str
    mode: str
    search: str
    num_samples: int
    asha: AshaSettings | None
    max_concurrent_trials: int
    register_model: str
    seed: int
    max_failures: int = 1
    """Retries of a trial whose attempt failed (its driver died, e.g. its node was lost); a
    retry resumes the trial's Train run from its last checkpoint."""
    fixed: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Dimension] = field(default_factory=dict)
    losses: dict[str, dict[str, Dimension]] = field(default_factory=dict)

    @property
    def registered_model_name(self) -> str:
        """Name the best trial's model is registered under."""
        return self.register_model or f"{self.name}-best"

    def swept_keys(self) -> list[str]:
        """Config paths some trial samples (shared and per-loss), in file order."""
        keys = [k for k, d in self.space.items() if d.sampled]
        for dims in self.losses.values():
            keys += [k for k, d in dims.items() if d.sampled and k not in keys]
        return keys


_TOP_LEVEL = {
    "name", "preset", "fixed", "metric", "mode", "search", "num_samples", "asha",
    "max_concurrent_trials", "register_model", "seed", "max_failures", "space", "losses",
}


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and structurally check a sweep file (config paths are checked by
    `candidate_configs`)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} " + ("is a folder" if path.is_dir() else "does not exist"))
    text = path.read_text()
    try:
        raw = parse_yaml(text) or {}
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: the top level must be a mapping")
    for key in raw:
        if key not in _TOP_LEVEL:
            close = difflib.get_close_matches(str(key), _TOP_LEVEL, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(sorted(_TOP_LEVEL))}"
            raise SweepError(f"{path}: {key}: unknown key{hint}")

    def need(key, kind, default=None):
        value = raw.get(key, default)
        if value is None:
            raise SweepError(f"{path}: {key}: required")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise SweepError(f"{path}: {key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    name = need("name", str)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SweepError(f"{path}: name: {name!r} must be letters, digits, '_', '.', '-' (it names folders)")
    search = need("search", str, "random")
    if search not in SEARCHES:
        raise SweepError(f"{path}: search: {search!r} is not one of {', '.join(SEARCHES)}")
    mode = need("mode", str, "max")
    if mode not in ("max", "min"):
        raise SweepError(f"{path}: mode: {mode!r} is not one of max, min")
    num_samples = need("num_samples", int, 1)
    if num_samples < 1:
        raise SweepError(f"{path}: num_samples: must be >= 1, got {num_samples}")
    max_concurrent = need("max_concurrent_trials", int, 0)
    if max_concurrent < 0:
        raise SweepError(f"{path}: max_concurrent_trials: must be >= 0 (0: from the cluster), got {max_concurrent}")
    max_failures = need("max_failures", int, 1)
    if max_failures < 0:
        raise SweepError(f"{path}: max_failures: must be >= 0 (retries of a failed trial), got {max_failures}")
    preset = need("preset", str, "local")
    if Path(preset).suffix and not Path(preset).is_absolute():
        # A YAML base config is found beside the sweep file, wherever the sweep is started.
        preset = str((path.parent / preset).resolve())

    spec = SweepSpec(
        path=str(path),
        text=text,
        name=name,
        preset=preset,
        metric=need("metric", str, "test/recall@1"),
        mode=mode,
        search=search,
        num_samples=num_samples,
        asha=_asha(raw.get("asha", {}), path),
        max_concurrent_trials=max_concurrent,
        register_model=need("register_model", str, ""),
        seed=need("seed", int, 0),
        max_failures=max_failures,
        fixed=_settings(raw.get("fixed") or {}, f"{path}: fixed"),
        space=_space(raw.get("space") or {}, f"{path}: space", search),
    )
    losses = raw.get("losses")
    if not isinstance(losses, dict) or not losses:
        raise SweepError(f"{path}: losses: required, a mapping from loss name to its space "
                         "(an empty mapping {} for a loss with nothing to sweep)")
    for loss, dims in losses.items():
        where = f"{path}: losses.{loss}"
        spec.losses[str(loss)] = _space(dims or {}, where, search)
        for key in spec.losses[str(loss)]:
            if key.startswith("loss.") and not key.startswith(f"loss.{loss}.") and key != "loss.lr":
                raise SweepError(f"{where}.{key}: belongs to another loss's section")
    for key in ("loss.name",):
        if key in spec.space or key in spec.fixed:
            raise SweepError(f"{path}: {key}: set by the losses mapping, not by space or fixed")
    for key in spec.space:
        if key in spec.fixed:
            raise SweepError(f"{path}: space.{key}: also in fixed; keep one")
        for loss, dims in spec.losses.items():
            if key in dims:
                raise SweepError(f"{path}: losses.{loss}.{key}: also in space; keep one")
    return spec


def _asha(raw, path) -> AshaSettings | None:
    if raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: asha: expected false or a mapping (grace_period, reduction_factor), got {raw!r}")
    try:
        asha = AshaSettings(**raw)
    except TypeError as err:
        raise SweepError(f"{path}: asha: {err} (keys: grace_period, reduction_factor)") from err
    if not isinstance(asha.grace_period, int) or asha.grace_period < 1:
        raise SweepError(f"{path}: asha.grace_period: must be an int >= 1 (epochs), got {asha.grace_period!r}")
    if not isinstance(asha.reduction_factor, (int, float)) or asha.reduction_factor <= 1:
        raise SweepError(f"{path}: asha.reduction_factor: must be > 1, got {asha.reduction_factor!r}")
    return asha


def _settings(raw, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: expected a mapping of config paths to values, got {raw!r}")
    return {str(k): v for k, v in raw.items()}


def _space(raw, where: str, search: str) -> dict[str, Dimension]:
    return {key: _dimension(key, value, f"{where}.{key}", search) for key, value in _settings(raw, where).items()}


def _dimension(key: str, raw, where: str, search: str) -> Dimension:
    if isinstance(raw, list):
        raise SweepError(f"{where}: a list is ambiguous: write {{choice: [...]}} to sample it, "
                         "or put a list-valued setting in fixed")
    if not isinstance(raw, dict):
        return Dimension(key, "constant", (raw,))
    if len(raw) != 1 or next(iter(raw)) not in SAMPLED_KINDS:
        raise SweepError(f"{where}: expected one of {', '.join(SAMPLED_KINDS)} "
                         f"(e.g. {{uniform: [0.1, 0.3]}}), got {raw!r}")
    kind, values = next(iter(raw.items()))
    if not isinstance(values, list) or not values:
        raise SweepError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
    if kind in RANGE_KINDS:
        if search == "grid":
            raise SweepError(f"{where}: a grid search cannot sample {kind}; list the values with choice")
        values = _bounds(kind, values, f"{where}.{kind}")
    elif kind == "grid" and search in ("optuna", "hyperopt"):
        raise SweepError(f"{where}: {search} samples every setting; use choice, not grid")
    return Dimension(key, kind, tuple(values))


def _bounds(kind: str, values: list, where: str) -> list:
    if len(values) != 2:
        raise SweepError(f"{where}: expected [low, high], got {values!r}")
    number = int if kind == "randint" else (int, float)
    if not all(isinstance(v, number) and not isinstance(v, bool) for v in values):
        kind_name = "ints" if kind == "randint" else "numbers"
        raise SweepError(f"{where}: expected two {kind_name}, got {values!r}")
    low, high = values
    if not low < high:
        raise SweepError(f"{where}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"{where}: a log range needs low > 0, got {low}")
    return [low, high] if kind == "randint" else [float(low), float(high)]


def override(key: str, value: Any) -> str:
    """`key=value` for `load_config`, with the value written as YAML reads it back
    (a float like 1e-05 is written 1.0e-05, which YAML 1.1 reads as a float)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def trial_settings(params: dict) -> dict[str, Any]:
    """The config settings a trial's sampled params stand for (per-loss branches flattened)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(trial_settings(value))
        else:
            out[key] = value
    return out


def base_overrides(spec: SweepSpec, cli_overrides: list[str]) -> list[str]:
    """The file's fixed settings, then the command line's (which win); refuses a command-line
    setting that the space samples, since the sampled value would silently replace it."""
    swept = set(spec.space) | {k for dims in spec.losses.values() for k in dims} | {"loss.name"}
    for item in cli_overrides:
        key = item.partition("=")[0].strip()
        if key in swept:
            raise SweepError(f"--set {key}: the sweep {spec.path} sets it per trial; "
                             "remove it from --set or from the space")
    return [override(k, v) for k, v in spec.fixed.items()] + list(cli_overrides)


def reported_metrics(config: Config) -> list[str]:
    """The metric names the training loop reports every evaluation: test/* (the Recall@K
    cut-offs the dataset's protocol gives, where `eval.recall_ks` is left to it), and the
    seen-class kNN accuracy when part of the training classes is held out."""
    from pipeline.evaluation.protocol import planned_recall_ks

    recall = [f"test/recall@{k}" for k in planned_recall_ks(config)]
    names = recall + ["test/map@r", "test/r_precision"]
    names += ["test/nmi"] if config.eval.nmi else []
    return names + (["seen/knn_accuracy"] if config.data.seen_holdout_fraction > 0 else [])


def candidate_configs(spec: SweepSpec, overrides: list[str]) -> dict[str, list[Config]]:
    """Per loss, the configs at the combinations of every swept setting's candidates (its
    listed values, or a range's ends), each validated; a bad path, value or combination stops
    here, naming the sweep file, the settings and their values. `overrides` are
    `base_overrides`.

    Every combination is built when a loss has at most `COMBINATIONS_CHECKED` of them, else
    every pair of settings at every pair of their values (the others at their first value).
    The first value alone comes first, then one setting changed at a time, so a value that is
    bad on its own is named alone."""
    out: dict[str, list[Config]] = {}
    for loss, dims in spec.losses.items():
        candidates = {key: dim.candidates() for key, dim in {**spec.space, **dims}.items()}
        first = {key: values[0] for key, values in candidates.items()}
        swept = [key for key, values in candidates.items() if len(values) > 1]
        combinations = math.prod(len(values) for values in candidates.values())
        most_changed = len(swept) if combinations <= COMBINATIONS_CHECKED else 2
        configs = []
        for changed in _changed_settings(candidates, swept, most_changed):
            settings = {"loss.name": loss, **first, **changed}
            where = f"losses.{loss}"
            if changed:
                where += " with " + ", ".join(f"{k}={v!r}" for k, v in changed.items())
            if 1 < len(changed) < len(swept):
                where += " (the other swept settings at their first value or lower bound)"
            try:
                config = load_config(spec.preset, overrides + [override(k, v) for k, v in settings.items()])
            except ConfigError as err:
                raise SweepError(f"{spec.path}: {where}: {err}") from err
            # A setting changed alone keeps the message it has always had (without its value).
            _check_trial_config(spec, config, where if len(changed) > 1 else f"losses.{loss}")
            configs.append(config)
        out[loss] = configs
    return out


def _changed_settings(candidates: dict[str, list], swept: list[str], most_changed: int):
    """The settings a checked config changes from the first candidates: none, then each
    swept setting alone, then each pair, and so on up to `most_changed` settings at once
    (all of `swept`: the whole product, each combination once)."""
    for count in range(most_changed + 1):
        for keys in itertools.combinations(swept, count):
            for values in itertools.product(*(candidates[key][1:] for key in keys)):
                yield dict(zip(keys, values, strict=True))


def _check_trial_config(spec: SweepSpec, config: Config, where: str) -> None:
    if config.eval.every_epochs != 1:
        raise SweepError(
            f"{spec.path}: {where}: eval.every_epochs is {config.eval.every_epochs}; a sweep needs "
            "the metric every epoch (for ASHA and the search), set it to 1"
        )
    try:
        reported = reported_metrics(config)
    except (ValueError, OSError) as err:  # no readable metadata.json, an unreachable store (named in err)
        raise SweepError(f"{spec.path}: {where}: data.root: {err}") from err
    if spec.metric not in reported:
        raise SweepError(
            f"{spec.path}: metric: {spec.metric!r} is not reported by {where}; "
            f"choose one of {', '.join(reported)}"
        )
    if spec.asha is not None and spec.asha.grace_period >= config.train.epochs:
        raise SweepError(
            f"{spec.path}: asha.grace_period: {spec.asha.grace_period} epochs leaves no epoch "
            f"before the last of train.epochs {config.train.epochs} ({where}) to stop a trial at"
        )


def space_params(spec: SweepSpec, overrides: list[str]) -> dict[str, str]:
    """The sweep as flat MLflow params of its parent run."""
    params = {
        "sweep.search": spec.search,
        "sweep.metric": spec.metric,
        "sweep.mode": spec.mode,
        "sweep.num_samples": str(spec.num_samples),
        "sweep.max_failures": str(spec.max_failures),
        "sweep.preset": spec.preset,
        "sweep.losses": ",".join(spec.losses),
        "sweep.asha": "off" if spec.asha is None else
        f"grace_period={spec.asha.grace_period},reduction_factor={spec.asha.reduction_factor}",
    }
    for item in overrides:
        key, _, value = item.partition("=")
        params[f"base.{key}"] = value
    params.update({f"space.{k}": d.describe() for k, d in spec.space.items()})
    for loss, dims in spec.losses.items():
        params.update({f"losses.{loss}.{k}": d.describe() for k, d in dims.items()})
    return params


def resource_need(config: Config) -> dict[str, float]:
    """Logical resources one trial of this config holds while it trains: its driver function
    (Tune's default 1 CPU) and what its run holds (`run_resources`)."""
    from pipeline.training.resources import run_resources

    need = run_resources(config)
    return {"CPU": TRIAL_DRIVER_CPUS + need["CPU"], "GPU": need["GPU"]}


def trial_concurrency(configs: list[Config], cluster: dict[str, float], requested: int = 0,
                      *, nodes_may_come: bool = False, printer=print) -> int:
    """How many trials run at once: as many as the cluster's CPUs and GPUs hold for the most
    demanding trial config (or `requested`, if smaller). GPU shares are packed as Ray places
    them (`gpu_requests_fit`), not summed. Raises when not even one fits, unless
    `nodes_may_come` (a cluster, whose autoscaler may start nodes for waiting trials) and the
    sweep file asked for a number (`requested`): that is used, and `printer` warns that on a
    cluster of fixed size the trials would wait for ever."""
    from pipeline.training.resources import GPU_PACKING, gpu_requests, gpu_requests_fit

    def wait_for_nodes(shortfall: str) -> int:
        printer(f"warning: {shortfall}: the sweep's {requested} trial(s) wait for the nodes an "
                "autoscaler starts; on a cluster of fixed size they would wait for ever (stop the "
                "sweep)", flush=True)
        return requested

    need = {
        kind: max(resource_need(c)[kind] for c in configs) for kind in ("CPU", "GPU")
    }
    fits = []
    for kind, amount in need.items():
        if amount <= 0:
            continue
        have = cluster.get(kind, 0.0)
        if have + 1e-9 < amount:
            if nodes_may_come and requested:
                return wait_for_nodes(f"a trial needs {amount:g} {kind} but the cluster has {have:g} now")
            raise SweepError(
                f"a trial needs {amount:g} {kind} (driver, workers, decode and refresh actors) "
                f"but the cluster has {have:g}" + (
                    "; on an autoscaling cluster whose nodes are not up yet, set "
                    "max_concurrent_trials in the sweep file (trials then wait for the nodes)"
                    if nodes_may_come else ""
                )
            )
        fits.append(math.floor(have / amount + 1e-9))
    gpus = int(cluster.get("GPU", 0))
    for config in configs:
        requests = gpu_requests(config)
        if requests:  # how many trials' GPU shares Ray can place together (at most their sum's)
            trials = 0
            while trials < math.floor(gpus / sum(requests) + 1e-9) and gpu_requests_fit(requests * (trials + 1), gpus):
                trials += 1
            shortfall = f"a trial's GPU shares {requests} do not fit on the cluster's {gpus} GPUs"
            if trials == 0 and nodes_may_come and requested:
                return wait_for_nodes(shortfall)
            if trials == 0:
                raise SweepError(f"{shortfall}: {GPU_PACKING}")
            fits.append(trials)
    derived = max(1, min(fits))
    return min(derived, requested) if requested else derived


def sweep_fingerprint(spec: SweepSpec, overrides: list[str]) -> str:
    """A digest of what a resumed sweep must share with the sweep it resumes: the file's
    text and the base settings."""
    text = yaml.safe_dump({"file": spec.text, "preset": spec.preset, "overrides": overrides})
    return hashlib.sha256(text.encode()).hexdigest()[:12]
