"""Config loading: presets, overrides, and one clear message for every kind of mistake."""

from __future__ import annotations

import pytest

from jobs.train import main as train_main
from pipeline.config import (
    ConfigError,
    available_presets,
    config_from_dict,
    config_to_dict,
    describe,
    load_config,
)


def test_presets_load_and_round_trip():
    assert {"local", "gpu"} <= set(available_presets())
    for name in available_presets():
        config = load_config(name)
        assert config_from_dict(config_to_dict(config)) == config


def test_overrides_take_precedence_and_are_typed():
    config = load_config("local", ["loss.triplet.margin=0.3", "train.epochs=2", "optim.lr=1"])
    assert config.loss.triplet.margin == 0.3
    assert config.train.epochs == 2
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)


def test_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss:\n  name: normalized_softmax\nsampler:\n  name: shuffle\n")
    config = load_config(str(path))
    assert config.loss.name == "normalized_softmax" and config.sampler.name == "shuffle"


def test_numbers_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML's safe_load) reads 1e-3 as the string '1e-3'.
    config = load_config("local", ["optim.lr=1e-3", "loss.lr=2E-2", "optim.weight_decay=5e-05"])
    assert (config.optim.lr, config.loss.lr, config.optim.weight_decay) == (1e-3, 2e-2, 5e-5)
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 3e-4\nloss:\n  lr: 1e+1\n")
    config = load_config(str(path))
    assert (config.optim.lr, config.loss.lr) == (3e-4, 10.0)
    assert load_config("local", ["data.cache_dir=1e3x"]).data.cache_dir == "1e3x"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.margn=0.2"], "loss.margn: unknown setting"),
        (["loss.triplet.margn=0.2"], "did you mean 'margin'"),
        (["train.num_workers=two"], "train.num_workers: expected int, got 'two'"),
        (["train.num_workers=0"], "train.num_workers: must be > 0"),
        (["train.epochs=true"], "train.epochs: expected int, got True"),
        (["loss.name=magic"], "loss.name: 'magic' is not one of"),
        (["data.eval_resize=16"], "data.eval_resize: 16 is smaller than data.image_size"),
        (["sampler.name=shuffle"], "needs sampler.name=m_per_class"),
        (["sampler.samples_per_class=1"], "sampler.samples_per_class: must be >= 2"),
        (["sampler.name=hard_pools", "sampler.pool_size=0"], "sampler.pool_size: must be > 0"),
        (["sampler.name=hard_pools", "sampler.pool_draws_per_class=-1"], "sampler.pool_draws_per_class: must be > 0"),
        (["sampler.name=hard_pools", "loss.name=magnet"], "neighbourhood batches and the magnet loss go together"),
        (["refresh.pool_index=IVFx"], "refresh.pool_index: index description 'IVFx': faiss cannot build it"),
        (["refresh.pool_search_params=nprobe=8"], "refresh.pool_search_params: search parameters 'nprobe=8' do not apply"),
        (["refresh.pool_index=HNSW32", "refresh.pool_search_params=nprobe=8"], "to a 'HNSW32' index"),
        (["data.seen_holdout_fraction=1.0"], "data.seen_holdout_fraction: must be in [0, 1)"),
        (["eval.seen_knn_k=0"], "eval.seen_knn_k: must be >= 1"),
        (["train.use_gpu=true", "train.gpus_per_worker=0.5"], "train.gpus_per_worker: must be in (0.5, 1], got 0.5"),
        (["train.use_gpu=true", "train.gpus_per_worker=2"], "train.gpus_per_worker: must be in (0.5, 1], got 2"),
        (["refresh.num_gpus=1.5"], "refresh.num_gpus: above 1 it must be a whole number, got 1.5"),
        (["eval.recall_ks=[1, 0]"], "eval.recall_ks"),
        (["storage.s3_endpoint_url=minio:9000"], "storage.s3_endpoint_url: 'minio:9000' is not an http"),
        (["storage.s3_max_attempts=0"], "storage.s3_max_attempts: must be >= 1"),
        (["train.storage_path=s3://KEY:SECRET@bucket/runs"], "train.storage_path: the URI carries credentials"),
        # pyarrow would take 's3:/bucket' for a local folder named 's3:'.
        (["train.storage_path=s3:/bucket/runs"],
         "train.storage_path: 's3:/bucket/runs' is neither a path nor a URI; did you mean 's3://bucket/runs'?"),
        (["data.root=s3://"], "data.root: 's3://' names no bucket (s3://BUCKET/prefix)"),
        (["data.root=s3:///bucket/x"], "data.root: 's3:///bucket/x' is neither a path nor a URI; did you mean 's3://bucket/x'?"),
        (["model.pretrained=file:/w/r50.pth"], "model.pretrained: 'file:/w/r50.pth' is not a file URI; did you mean 'file:///w/r50.pth'?"),
        (["train=3"], "train: expected a section"),
        (["nonsense"], "expected KEY=VALUE"),
        (["eval.recall_ks=[1, 2"], "override 'eval.recall_ks=[1, 2': the value is not valid YAML"),
        (["data.decode_cpus=-1"], "data.decode_cpus: must be >= 0, got -1"),
        (["optim.momentum=-5"], "optim.momentum: must be in [0, 1), got -5"),
        (["optim.momentum=1"], "optim.momentum: must be in [0, 1), got 1"),
        (["loss.softtriple.gamma=0"], "loss.softtriple.gamma: must be > 0, got 0"),
        (["loss.pddm.lam=-0.5"], "loss.pddm.lam: must be >= 0, got -0.5"),
        (["loss.contrastive.neg_margin=-1"], "loss.contrastive.neg_margin: must be >= 0, got -1"),
    ],
)
def test_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config("local", overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        # A key that only the losses have: every loss that has it, by full path.
        ("loss.margin=0.1", "loss.margin: unknown setting (did you mean loss.triplet.margin, "
         "loss.normalized_softmax.margin, loss.softtriple.margin or loss.proxy_anchor.margin?)"),
        ("loss.mining=hard", "loss.mining: unknown setting (did you mean loss.triplet.mining?)"),
        # Not a key of any subsection: the nearest key of the section, as before.
        ("optim.lrr=0.1", "optim.lrr: unknown setting (did you mean 'lr'?)"),
    ],
)
def test_unknown_key_names_the_subsections_that_have_it(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("local", [override])
    assert str(err.value) == message


def test_unknown_key_in_a_yaml_file_names_the_subsections_that_have_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss:\n  temperature: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value) == "loss.temperature: unknown setting (did you mean loss.normalized_softmax.temperature?)"


@pytest.mark.parametrize("overrides", [["loss.name=magnet", "sampler.name=neighbourhoods"],
                                       ["loss.name=pddm", "sampler.name=hard_pools"]])
def test_the_gpu_preset_takes_magnet_and_pddm_as_they_are(overrides):
    # Its data.prefetch_batches (8) needs refresh.max_plan_ahead_steps >= 10 with a refresh actor.
    config = load_config("gpu", overrides)
    assert config.uses_refresh_actor and config.refresh.max_plan_ahead_steps >= config.data.prefetch_batches + 2


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; presets: .*local"):
        load_config("nope")


def test_softmax_runs_with_plain_shuffling():
    config = load_config("local", ["loss.name=normalized_softmax", "sampler.name=shuffle"])
    assert config.sub_batch_size == config.sampler.batch_size


def test_every_setting_is_documented():
    lines = describe()
    assert any("loss.triplet.margin" in line for line in lines)
    assert all(not line.rstrip().endswith("#") for line in lines)


def test_job_rejects_bad_config_before_ray(capsys, ray_must_not_start):
    assert train_main(["--set", "train.num_workers=-1"]) == 2
    assert "config error: train.num_workers: must be > 0" in capsys.readouterr().err


def test_pddm_preset_plans_hard_pools_with_the_refresh_actor():
    config = load_config("pddm")
    assert config.loss.name == "pddm" and config.sampler.name == "hard_pools" and config.uses_refresh_actor
    s = config.sampler
    assert config.sub_batch_size == s.classes_per_batch * (s.samples_per_class + s.pool_draws_per_class)


def test_a_local_path_with_a_colon_is_a_path_not_a_mistyped_uri():
    config = load_config("local", ["train.storage_path=runs-12:30/x", "data.cache_dir=C:/data"])
    assert (config.train.storage_path, config.data.cache_dir) == ("runs-12:30/x", "C:/data")


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("s3://bucket/cache/", "s3://bucket/cache"),  # a URI is kept, not made a local folder
        ("gs://bucket/a//", "gs://bucket/a"),
        ("file:///", "file:///"),
        ("file:///data/", "file:///data"),
        ("runs-12:30/x", "{cwd}/runs-12:30/x"),
        ("data/", "{cwd}/data"),
    ],
)
def test_locations_handed_to_other_processes_are_absolute_and_uris_stay_uris(location, expected, monkeypatch, tmp_path):
    from pipeline.storage import absolute_location

    monkeypatch.chdir(tmp_path)
    assert absolute_location(location) == expected.format(cwd=tmp_path.resolve())


def test_a_setting_added_later_leaves_the_names_of_earlier_runs_as_they_were():
    """Rerunning a command resumes its run only if the derived name is the same: a setting
    added since (`DIGEST_SKIPS_AT_DEFAULT`) changes it only when it is set."""
    from pipeline.training.driver import run_name_for

    # The names at 5927f85, before eval.metrics_cpus existed.
    before = {"local": "triplet-tiny_cnn-063ecb0d", "magnet": "magnet-tiny_cnn-f9e48b1e",
              "gpu": "triplet-resnet50-8c8b87de"}
    assert {preset: run_name_for(load_config(preset)) for preset in before} == before
    assert run_name_for(load_config("local", ["eval.metrics_cpus=4"])) != before["local"]


def test_a_location_names_one_run_however_it_is_spelled():
    from pipeline.training.driver import run_name_for

    spellings = [
        ("s3://b/runs", "s3://b/cars", "data", "w.pt"),
        ("s3://b/runs/", "s3://b/cars//", "./data", "./w.pt"),
        ("s3://b/runs///", "s3://b/cars/", "data/", "models/../w.pt"),
    ]
    configs = [
        load_config("local", [f"train.storage_path={s}", f"data.root={r}", f"data.cache_dir={c}", f"model.pretrained={p}"])
        for s, r, c, p in spellings
    ]
    assert len({run_name_for(c) for c in configs}) == 1  # a rerun resumes, whichever spelling
    assert (configs[1].train.storage_path, configs[1].data.root) == ("s3://b/runs", "s3://b/cars")
    assert (configs[2].data.cache_dir, configs[2].model.pretrained) == ("data", "w.pt")
    assert load_config("local").data.root == ""  # unset stays unset (the built-in dataset)
