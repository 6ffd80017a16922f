"""Build a `Config` from a preset or YAML file plus `--set` overrides, type-checked field by field."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config.settings import Config

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


class ConfigError(ValueError):
    """A config that cannot run: the message names the field and what is wrong."""


class _NumberLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` (no dot) as a string; learning rates and weight decays are written so."""


_NumberLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML as `yaml.safe_load` reads it, except that `1e-4` is a number (as in YAML 1.2).
    Presets, config files, `--set` values and sweep files are all read this way."""
    return yaml.load(text, Loader=_NumberLoader)


def available_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset_or_path: str | dict | None = None, overrides: list[str] | None = None, *,
                consistent: bool = True) -> Config:
    """Defaults, then a preset name or YAML path (or what `read_preset` read from one), then
    `a.b=value` overrides; validated. With `consistent` False, each setting is checked on its
    own but not against the others (overrides that will go on top of another config, such as
    a checkpoint's, are checked with it there)."""
    raw: dict[str, Any] = {}
    if isinstance(preset_or_path, dict):
        raw = copy.deepcopy(preset_or_path)
    elif preset_or_path:
        raw = read_preset(preset_or_path)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. loss.triplet.margin=0.2")
        try:
            value = parse_yaml(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {err}") from err
        _set_path(raw, key.strip().split("."), value)
    config = _build(Config, raw, "")
    _normalize_locations(config)
    validate(config, consistent=consistent)
    return config


LOCATION_SETTINGS = ("data.root", "data.cache_dir", "train.storage_path", "model.pretrained")
"""Settings that name a place (a local path or a URI)."""


def _normalize_locations(config: Config) -> None:
    from pipeline.storage import normalize_location  # imports pyarrow: only when loading

    for key in LOCATION_SETTINGS:
        section, name = key.split(".")
        node = getattr(config, section)
        value = getattr(node, name)
        if isinstance(value, str):  # (a wrong type is validate's to name)
            setattr(node, name, normalize_location(value))


def read_preset(preset_or_path: str) -> dict[str, Any]:
    """The settings of a preset name or YAML file, as read (not yet checked): `load_config`
    takes them in its place, where the file may not be (a sweep trial on another node)."""
    path = Path(preset_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{preset_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown preset {preset_or_path!r}; presets: {', '.join(available_presets())}"
            )
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _set_path(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {key} is a value, not a section")
    node[keys[-1]] = value


def _build(cls, raw: Any, prefix: str):
    """Instantiate dataclass `cls` from a mapping, checking every key and value type."""
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"{prefix}{key}: unknown setting{_unknown_key_hint(cls, key, prefix)}")
    values = {}
    for name, value in raw.items():
        path = f"{prefix}{name}"
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, path + ".")
        else:
            values[name] = _coerce(kind, value, path)
    return cls(**values)


def _unknown_key_hint(cls, key: str, prefix: str) -> str:
    """Where an unknown key of section `cls` probably belongs, as the tail of the error message."""
    # `loss.margin` means some loss's own margin: name those full paths before guessing a
    # spelling, since difflib would only offer this section's keys ('magnet').
    nested = _nested_paths(cls, key, prefix)
    if nested:
        return f" (did you mean {_or_list(nested)}?)"
    fields = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, fields, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(fields)}"


def _nested_paths(cls, key: str, prefix: str) -> list[str]:
    """Full paths of the settings or sections named `key` anywhere below section `cls`."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            section = f"{prefix}{f.name}."
            if any(g.name == key for g in dataclasses.fields(kind)):
                paths.append(f"{section}{key}")
            paths.extend(_nested_paths(kind, key, section))
    return paths


def _or_list(items: list[str]) -> str:
    """`a`, `a or b`, `a, b or c`."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _coerce(kind, value: Any, path: str):
    """Check `value` against the annotation; ints are accepted where floats are expected."""
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return value
    if kind in (int, float, str, bool):
        # bool is an int subclass: reject True where a number is expected and vice versa.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{path}: expected {kind.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported setting type {kind}")


def _check_pool_index(config: Config) -> None:
    """The hard pools' faiss index and its search parameters, built once to see faiss accept them."""
    from pipeline.refresh.hard_pools import pool_search_index  # late import: faiss

    refresh = config.refresh
    try:
        pool_search_index(config.model.embedding_dim, refresh.pool_index)
    except ValueError as err:
        raise ConfigError(f"refresh.pool_index: {err}") from err
    try:
        pool_search_index(config.model.embedding_dim, refresh.pool_index, refresh.pool_search_params)
    except ValueError as err:
        raise ConfigError(f"refresh.pool_search_params: {err}") from err


def validate(config: Config, consistent: bool = True) -> None:
    """Every value range and, when `consistent`, every cross-field rule; raises ConfigError
    naming the field."""
    positive = {
        "data.image_size": config.data.image_size,
        "data.eval_resize": config.data.eval_resize,
        "data.decode_actors": config.data.decode_actors,
        "data.synthetic.num_classes": config.data.synthetic.num_classes,
        "data.synthetic.images_per_class": config.data.synthetic.images_per_class,
        "data.synthetic.modes_per_class": config.data.synthetic.modes_per_class,
        "sampler.classes_per_batch": config.sampler.classes_per_batch,
        "sampler.samples_per_class": config.sampler.samples_per_class,
        "sampler.batch_size": config.sampler.batch_size,
        "sampler.pool_size": config.sampler.pool_size,
        "sampler.pool_draws_per_class": config.sampler.pool_draws_per_class,
        "model.embedding_dim": config.model.embedding_dim,
        "optim.lr": config.optim.lr,
        "loss.lr": config.loss.lr,
        "train.num_workers": config.train.num_workers,
        "train.epochs": config.train.epochs,
        "train.log_every_steps": config.train.log_every_steps,
        "train.checkpoints_to_keep": config.train.checkpoints_to_keep,
        "train.torch_threads": config.train.torch_threads,
        "eval.batch_size": config.eval.batch_size,
        "eval.every_epochs": config.eval.every_epochs,
        "loss.normalized_softmax.temperature": config.loss.normalized_softmax.temperature,
        "loss.magnet.clusters_per_class": config.loss.magnet.clusters_per_class,
        "loss.magnet.neighbourhoods_per_rank": config.loss.magnet.neighbourhoods_per_rank,
        "loss.magnet.nearest_clusters": config.loss.magnet.nearest_clusters,
        "loss.magnet.seed_floor": config.loss.magnet.seed_floor,
        "refresh.batch_size": config.refresh.batch_size,
        "refresh.max_plan_ahead_steps": config.refresh.max_plan_ahead_steps,
        "data.synthetic.image_size": config.data.synthetic.image_size,
        "loss.multi_similarity.alpha": config.loss.multi_similarity.alpha,
        "loss.multi_similarity.beta": config.loss.multi_similarity.beta,
        "loss.proxy_anchor.alpha": config.loss.proxy_anchor.alpha,
        "loss.softtriple.centers_per_class": config.loss.softtriple.centers_per_class,
        "loss.softtriple.la": config.loss.softtriple.la,
        "loss.softtriple.gamma": config.loss.softtriple.gamma,
        "loss.pddm.hidden_dim": config.loss.pddm.hidden_dim,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name}: must be > 0, got {value}")
    non_negative = {
        "train.steps_per_epoch": config.train.steps_per_epoch,
        "train.cpus_per_worker": config.train.cpus_per_worker,
        "optim.weight_decay": config.optim.weight_decay,
        "optim.warmup_steps": config.optim.warmup_steps,
        "optim.grad_clip": config.optim.grad_clip,
        "loss.triplet.margin": config.loss.triplet.margin,
        "loss.magnet.alpha": config.loss.magnet.alpha,
        "refresh.every_steps": config.refresh.every_steps,
        "refresh.num_cpus": config.refresh.num_cpus,
        "refresh.num_gpus": config.refresh.num_gpus,
        "refresh.cache_max_mb": config.refresh.cache_max_mb,
        "refresh.max_restarts": config.refresh.max_restarts,
        "refresh.lag_steps": config.refresh.lag_steps,
        "data.decode_cpus": config.data.decode_cpus,
        "eval.cache_max_mb": config.eval.cache_max_mb,
        "eval.metrics_cpus": config.eval.metrics_cpus,
        "loss.normalized_softmax.margin": config.loss.normalized_softmax.margin,
        "loss.contrastive.pos_margin": config.loss.contrastive.pos_margin,
        "loss.contrastive.neg_margin": config.loss.contrastive.neg_margin,
        "loss.multi_similarity.epsilon": config.loss.multi_similarity.epsilon,
        "loss.proxy_anchor.margin": config.loss.proxy_anchor.margin,
        "loss.softtriple.tau": config.loss.softtriple.tau,
        "loss.softtriple.margin": config.loss.softtriple.margin,
        "loss.pddm.alpha": config.loss.pddm.alpha,
        "loss.pddm.beta": config.loss.pddm.beta,
        "loss.pddm.lam": config.loss.pddm.lam,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{name}: must be >= 0, got {value}")
    if consistent and config.data.eval_resize < config.data.image_size:
        raise ConfigError(
            f"data.eval_resize: {config.data.eval_resize} is smaller than data.image_size "
            f"{config.data.image_size}; the center crop would not fit"
        )
    if not 0.0 <= config.optim.momentum < 1.0:
        raise ConfigError(f"optim.momentum: must be in [0, 1), got {config.optim.momentum}")
    if not 0.0 < config.data.crop_scale_min <= 1.0:
        raise ConfigError(f"data.crop_scale_min: must be in (0, 1], got {config.data.crop_scale_min}")
    if not 0.0 < config.data.synthetic.test_fraction < 1.0:
        raise ConfigError(
            f"data.synthetic.test_fraction: must be in (0, 1), got {config.data.synthetic.test_fraction}"
        )
    if not 0.0 <= config.data.seen_holdout_fraction < 1.0:
        raise ConfigError(
            f"data.seen_holdout_fraction: must be in [0, 1), got {config.data.seen_holdout_fraction}"
        )
    if consistent and config.train.use_gpu and not 0.5 < config.train.gpus_per_worker <= 1.0:
        # Above half a GPU each, Ray never puts two DDP ranks on one GPU (NCCL refuses that).
        raise ConfigError(f"train.gpus_per_worker: must be in (0.5, 1], got {config.train.gpus_per_worker}")
    if config.refresh.num_gpus > 1 and config.refresh.num_gpus != int(config.refresh.num_gpus):
        # Ray places a fraction within one GPU, and takes more than one only as whole GPUs.
        raise ConfigError(f"refresh.num_gpus: above 1 it must be a whole number, got {config.refresh.num_gpus:g}")
    if config.eval.seen_knn_k < 1:
        raise ConfigError(f"eval.seen_knn_k: must be >= 1, got {config.eval.seen_knn_k}")
    magnet = config.loss.magnet
    if magnet.clusters_per_neighbourhood < 2:
        raise ConfigError(
            "loss.magnet.clusters_per_neighbourhood: must be >= 2 (a seed cluster and at least one impostor), "
            f"got {magnet.clusters_per_neighbourhood}"
        )
    if magnet.examples_per_cluster < 2:
        raise ConfigError(
            "loss.magnet.examples_per_cluster: must be >= 2 (one example per cluster leaves no "
            f"within-cluster variance), got {magnet.examples_per_cluster}"
        )
    if not 0.0 <= magnet.sigma2_momentum < 1.0:
        raise ConfigError(f"loss.magnet.sigma2_momentum: must be in [0, 1), got {magnet.sigma2_momentum}")
    if consistent:
        _check_consistency(config)
    ks = config.eval.recall_ks
    if not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in ks):
        raise ConfigError(
            f"eval.recall_ks: expected a list of positive ints (empty: the dataset's), got {ks!r}"
        )
    from pipeline.storage import check_settings  # imports pyarrow: only when validating

    try:
        check_settings(config)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_consistency(config: Config) -> None:
    """The rules that tie settings to each other (part of `validate`)."""
    if config.uses_refresh_actor and config.refresh.max_plan_ahead_steps < config.data.prefetch_batches + 2:
        # Ray Data's iterator waits for `prefetch_batches` sub-batches before it yields the
        # first, and ranks report a step one step late: a planner held closer to training
        # than that would wait for steps that wait for it.
        raise ConfigError(
            f"refresh.max_plan_ahead_steps: must be >= data.prefetch_batches + 2 = "
            f"{config.data.prefetch_batches + 2}, got {config.refresh.max_plan_ahead_steps}"
        )
    lag = config.refresh.lag_steps
    if config.uses_refresh_actor and lag != 0 and lag <= config.refresh.max_plan_ahead_steps:
        # A planner runs up to max_plan_ahead_steps ahead of training; the weights it plans from
        # must already be published then, or it would wait for steps that wait for it.
        raise ConfigError(
            f"refresh.lag_steps: must be 0 (newest index) or > refresh.max_plan_ahead_steps = "
            f"{config.refresh.max_plan_ahead_steps}, got {lag}"
        )
    _check_pool_index(config)
    if config.sampler.name in ("m_per_class", "hard_pools") and config.sampler.samples_per_class < 2:
        raise ConfigError("sampler.samples_per_class: must be >= 2 so every example has a positive")
    if not config.data.root:
        from pipeline.data.synthetic import SyntheticSpec

        try:
            SyntheticSpec(**vars(config.data.synthetic))
        except ValueError as err:
            raise ConfigError(f"data.synthetic: {err}") from err
    from pipeline.losses import batch_requirement  # late import: losses import torch

    need = batch_requirement(config.loss.name)
    if need == "m_per_class" and config.sampler.name not in ("m_per_class", "hard_pools"):
        raise ConfigError(
            f"sampler.name: loss {config.loss.name!r} mines pairs inside the batch and needs "
            f"sampler.name=m_per_class or hard_pools, got {config.sampler.name!r}"
        )
    if (need == "neighbourhoods") != (config.sampler.name == "neighbourhoods"):
        raise ConfigError(
            f"sampler.name: neighbourhood batches and the magnet loss go together; got loss "
            f"{config.loss.name!r} with sampler {config.sampler.name!r} (the 'magnet' preset sets both)"
        )


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain nested dicts (what is saved with runs and checkpoints)."""
    return dataclasses.asdict(config)


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a validated Config from `config_to_dict` output (e.g. read from a checkpoint)."""
    config = _build(Config, raw, "")
    _normalize_locations(config)
    validate(config)
    return config


def config_from_yaml(text: str) -> Config:
    """Rebuild a validated Config from `config_to_yaml` output (a checkpoint's or an MLflow
    run's `config.yaml`)."""
    return config_from_dict(parse_yaml(text))


def flatten(config: Config) -> dict[str, Any]:
    """`section.field` -> value, for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(config_to_dict(config), "")
    return out


DIGEST_SKIPS_AT_DEFAULT = frozenset({"eval.metrics_cpus"})
"""Settings added after run names were derived from the digest: left out of it while at their
default, so a run named before one existed keeps its name, and rerunning its command resumes
it. A setting added later goes here."""


def config_digest(config: Config, length: int = 8) -> str:
    """A short stable hash of the resolved config (names runs; no timestamps)."""
    values, defaults = config_to_dict(config), config_to_dict(Config())
    for key in DIGEST_SKIPS_AT_DEFAULT:
        *sections, name = key.split(".")
        section, default = values, defaults
        for part in sections:
            section, default = section[part], default[part]
        if section[name] == default[name]:
            del section[name]
    text = json.dumps(values, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def describe(cls=Config, prefix: str = "") -> list[str]:
    """One line per setting: `path = default  # doc`, for `--help-config`."""
    lines = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"[{prefix}{f.name}]  {f.metadata.get('doc', '')}")
            lines.extend(describe(type(value), f"{prefix}{f.name}."))
        else:
            lines.append(f"  {prefix}{f.name} = {value!r}  # {f.metadata.get('doc', '')}")
    return lines
