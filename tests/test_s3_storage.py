"""S3 without Ray, against a real S3 server (moto over HTTP): the endpoint and retry settings
reach pyarrow, boto3 and MLflow; datasets, pretrained weights and the resume lookup work on
s3://; transient errors are retried (the run's MLflow store on S3: test_s3_train_e2e.py)."""

from __future__ import annotations

import http.client
import io
import json
import os
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import boto3
import pyarrow.fs as pafs
import pytest
import torch
from botocore.exceptions import ClientError

from pipeline import storage
from pipeline.config import load_config
from pipeline.config.settings import ModelConfig
from pipeline.data.format import (
    DatasetFormatError,
    read_split,
    shard_uris,
    validate_dataset,
    write_dataset,
)
from pipeline.data.synthetic import SyntheticSpec, ensure_synthetic, generate_synthetic
from pipeline.models import build_model
from pipeline.training.checkpoint import METRICS_FILE, latest_checkpoint

SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture
def s3_env(s3_server, restored_environ, monkeypatch):
    """This process talks to the moto server through the standard variable."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    return s3_server


def test_the_endpoint_setting_reaches_pyarrow_boto3_mlflow_and_ray_workers(
    s3_server, s3_bucket, restored_environ, tmp_path
):
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    config = load_config(
        "local", [f"storage.s3_endpoint_url={s3_server}", "storage.s3_max_attempts=5"]
    )
    worker_env = storage.export_settings(config)
    assert worker_env == {
        "AWS_ENDPOINT_URL_S3": s3_server,
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "AWS_MAX_ATTEMPTS": "5",
        "AWS_RETRY_MODE": "standard",
    }
    for name in SECRETS:  # credentials stay with each node's own AWS chain
        assert os.environ[name] not in json.dumps(worker_env)

    # pyarrow through the factory writes, boto3 (ours and a plain client) reads.
    filesystem, path = storage.filesystem_for(f"s3://{s3_bucket}/probe/a.bin")
    assert path == f"{s3_bucket}/probe/a.bin"
    with filesystem.open_output_stream(path) as stream:
        stream.write(b"written by pyarrow")
    assert storage.s3_client().get_object(Bucket=s3_bucket, Key="probe/a.bin")["Body"].read() == (
        b"written by pyarrow"
    )
    plain = boto3.client("s3")
    assert plain.meta.endpoint_url == s3_server
    assert plain.meta.config.retries["total_max_attempts"] == 5
    # pyarrow's own URI resolution (what Ray Data's readers use in the driver).
    plain_fs, prefix = pafs.FileSystem.from_uri(f"s3://{s3_bucket}/probe")
    assert [i.base_name for i in plain_fs.get_file_info(pafs.FileSelector(prefix))] == ["a.bin"]
    # MLflow's S3 artifact store.
    (tmp_path / "note.txt").write_text("logged by mlflow")
    S3ArtifactRepository(f"s3://{s3_bucket}/mlflow").log_artifact(str(tmp_path / "note.txt"))
    body = plain.get_object(Bucket=s3_bucket, Key="mlflow/note.txt")["Body"].read()
    assert body == b"logged by mlflow"


def test_the_config_endpoint_wins_and_bad_storage_settings_are_refused(
    s3_server, s3_bucket, restored_environ, monkeypatch
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    storage.export_settings(load_config("local", [f"storage.s3_endpoint_url={s3_server}"]))
    filesystem, path = storage.filesystem_for(f"s3://{s3_bucket}")
    assert filesystem.get_file_info(pafs.FileSelector(path)) == []

    cases = {
        "storage.s3_endpoint_url=minio:9000": "storage.s3_endpoint_url",
        "storage.s3_endpoint_url=http://AKIAKEY:topsecret@minio:9000": "carries credentials",
        "storage.s3_max_attempts=0": "storage.s3_max_attempts",
        "data.root=s3://AKIAKEY:topsecret@bucket/data": "data.root",
        "train.storage_path=s3://AKIAKEY:topsecret@bucket/runs": "train.storage_path",
        "model.pretrained=s3://AKIAKEY:topsecret@bucket/w.pt": "model.pretrained",
        "tracking.tracking_uri=http://admin:topsecret@mlflow:5000": "tracking.tracking_uri",
    }
    for override, message in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            storage.export_settings(load_config("local", [override]))
        assert "topsecret" not in str(err.value), "an error message repeats the credentials"


def test_exported_settings_put_the_environment_back(restored_environ, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://before:9000")
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    config = load_config("local", ["storage.s3_endpoint_url=http://inside:9000", "storage.s3_max_attempts=7"])
    with storage.exported_settings(config) as worker_env:
        assert storage.s3_endpoint_url() == "http://inside:9000"
        assert worker_env["AWS_MAX_ATTEMPTS"] == "7"
        assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://inside:9000"
    assert os.environ["AWS_ENDPOINT_URL_S3"] == "http://before:9000"
    assert "MLFLOW_S3_ENDPOINT_URL" not in os.environ
    assert "AWS_MAX_ATTEMPTS" not in os.environ
    with pytest.raises(RuntimeError), storage.exported_settings(config):  # also when it fails
        raise RuntimeError
    assert os.environ["AWS_ENDPOINT_URL_S3"] == "http://before:9000"


def test_datasets_are_written_validated_and_read_on_s3(s3_env, s3_bucket, tmp_path):
    spec = SyntheticSpec(num_classes=4, images_per_class=3, image_size=16, modes_per_class=1)
    root = f"s3://{s3_bucket}/datasets/tiny"
    meta = generate_synthetic(root, spec)
    local = generate_synthetic(tmp_path / "tiny", spec)
    assert meta.fingerprint == local.fingerprint
    assert validate_dataset(root, check_images=True, check_fingerprint=True) == meta
    assert read_split(root, "train").equals(read_split(tmp_path / "tiny", "train"))
    listed = storage.s3_client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    keys = {item["Key"] for item in listed if not item["Key"].endswith("/")}  # no dir markers
    assert keys == {"datasets/tiny/metadata.json"} | {
        f"datasets/tiny/{shard}" for split in meta.splits for shard in meta.split(split).shards
    }
    assert shard_uris(root, "test") == [f"{root}/{s}" for s in meta.split("test").shards]


def test_a_dataset_on_s3_is_replaced_only_once_its_replacement_is_whole(s3_env, s3_bucket):
    root = f"s3://{s3_bucket}/datasets/tiny"
    old = generate_synthetic(root, SyntheticSpec(num_classes=4, images_per_class=3, image_size=16, modes_per_class=1))
    train = read_split(root, "train")
    bad_rows = [{"label": 0, "image": train["image"][0].as_py(), "width": 16, "height": 16},
                {"label": 7, "image": b"", "width": 16, "height": 16}]  # label 7: no such class
    with pytest.raises(DatasetFormatError, match="label"):
        write_dataset(root, name="bad", source="test", class_names=old.class_names,
                      splits={"train": bad_rows}, image_format="png", overwrite=True)
    assert validate_dataset(root, check_images=True, check_fingerprint=True) == old

    new = generate_synthetic(
        root, SyntheticSpec(num_classes=4, images_per_class=5, image_size=16, modes_per_class=1), overwrite=True
    )
    assert validate_dataset(root, check_images=True, check_fingerprint=True) == new != old
    listed = storage.s3_client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    keys = {item["Key"] for item in listed if not item["Key"].endswith("/")}  # no dir markers
    assert keys == {"datasets/tiny/metadata.json"} | {
        f"datasets/tiny/{shard}" for split in new.splits for shard in new.split(split).shards
    }  # no staging copy left


def test_a_second_writer_of_the_built_in_dataset_never_touches_a_copy_in_use(s3_env, s3_bucket):
    # The race: a run generated the built-in dataset into an s3:// cache dir and trains on it,
    # while a second run, which looked before the first copy was complete, generates too.
    # With bucket versioning, any delete or rewrite of the first copy leaves a second version.
    client = storage.s3_client()
    client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    spec = SyntheticSpec(num_classes=4, images_per_class=3, image_size=16, modes_per_class=1)
    cache = f"s3://{s3_bucket}/cache/"
    first = ensure_synthetic(cache, spec)
    first_key = first.removeprefix(f"s3://{s3_bucket}/")
    metadata = client.get_object(Bucket=s3_bucket, Key=f"{first_key}/metadata.json")["Body"].read()
    client.delete_object(Bucket=s3_bucket, Key=f"{first_key}/metadata.json")  # not complete yet
    second = ensure_synthetic(cache, spec)
    client.put_object(Bucket=s3_bucket, Key=f"{first_key}/metadata.json", Body=metadata)

    assert second != first
    versions = client.list_object_versions(Bucket=s3_bucket, Prefix=f"{first_key}/")
    shards = [v for v in versions["Versions"] if v["Key"].endswith(".parquet")]  # no dir markers
    assert shards and not versions.get("DeleteMarkers", [])[1:]  # only the metadata's own
    assert len({v["Key"] for v in shards}) == len(shards), "the first copy's shards were rewritten"
    assert validate_dataset(first, check_fingerprint=True) == validate_dataset(second, check_fingerprint=True)
    # Later runs take the first complete copy by name and write nothing.
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert ensure_synthetic(cache, spec) == min(first, second)
    assert {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]} == keys
    # A copy whose writer was killed (no metadata.json) is skipped, and left alone.
    client.delete_object(Bucket=s3_bucket, Key=f"{min(first, second).removeprefix(f's3://{s3_bucket}/')}/metadata.json")
    assert ensure_synthetic(cache, spec) == max(first, second)


def test_pretrained_weights_load_from_s3(s3_env, s3_bucket):
    torch.manual_seed(1)
    source = build_model(ModelConfig(backbone="tiny_cnn"))
    buffer = io.BytesIO()
    torch.save(source.backbone.state_dict(), buffer)
    storage.s3_client().put_object(Bucket=s3_bucket, Key="weights/tiny.pt", Body=buffer.getvalue())

    torch.manual_seed(2)  # a different random init, replaced by the weights
    loaded = build_model(ModelConfig(backbone="tiny_cnn", pretrained=f"s3://{s3_bucket}/weights/tiny.pt"))
    for name, value in source.backbone.state_dict().items():
        torch.testing.assert_close(loaded.backbone.state_dict()[name], value, msg=name)
    with pytest.raises(FileNotFoundError, match="model.pretrained: no weights at s3://"):
        build_model(ModelConfig(backbone="tiny_cnn", pretrained=f"s3://{s3_bucket}/weights/none.pt"))


def test_resume_finds_the_latest_checkpoint_on_s3(s3_env, s3_bucket):
    client = storage.s3_client()

    def put(key, step=None):
        body = json.dumps({"step": step}) if step is not None else "partial"
        client.put_object(Bucket=s3_bucket, Key=f"runs/run/{key}", Body=body.encode())

    # Names sort the other way round from steps; the newest has no metrics yet (Ray never
    # reported it); a directory that is no checkpoint is ignored.
    put(f"checkpoint_2026-01-02/{METRICS_FILE}", step=4)
    put(f"checkpoint_2026-01-01/{METRICS_FILE}", step=8)
    put("checkpoint_2026-01-03/state.pt")
    put(f"not_a_checkpoint/{METRICS_FILE}", step=99)
    filesystem, directory, step = latest_checkpoint(f"s3://{s3_bucket}/runs", "run")
    assert (directory, step) == (f"{s3_bucket}/runs/run/checkpoint_2026-01-01", 8)
    with filesystem.open_input_stream(f"{directory}/{METRICS_FILE}") as stream:
        assert json.loads(stream.read()) == {"step": 8}
    assert latest_checkpoint(f"s3://{s3_bucket}/runs", "other") is None


# ----------------------------------------------------------------------------- retries


class FlakyS3Proxy:
    """A real HTTP server in front of the S3 server that answers the next `fail` requests with
    503 SlowDown (what S3 says when throttling) and forwards everything else, less the request
    headers named in `dropped_headers` (lower case). `rule(method, headers)` may single out
    requests: "fail" answers 503 without forwarding, "lose" forwards, then answers 503 (the store
    did it; its reply was lost)."""

    def __init__(self, upstream: str):
        target = urlsplit(upstream)
        self.dropped_headers: set[str] = set()
        self.rule = None
        self.failures_left = 0
        self.failed = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1 answers botocore's "Expect: 100-continue" at once (under 1.0 each PUT
            # waited a second for it).
            protocol_version = "HTTP/1.1"

            def _fail(self):
                error = b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(error)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(error)

            def _body(self) -> bytes:
                """The request's body; a chunked one (pyarrow's uploads) is read whole and sent
                on with a Content-Length."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline().strip():  # trailers, up to the blank line
                    pass
                return b"".join(chunks)

            def _serve(self):
                body = self._body()
                with proxy.lock:
                    action = proxy.rule(self.command, self.headers) if proxy.rule else None
                    fail = proxy.failures_left > 0 or action == "fail"
                    if proxy.failures_left > 0:
                        proxy.failures_left -= 1
                    proxy.failed += fail
                if fail:
                    self._fail()
                    return
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in proxy.dropped_headers | {"transfer-encoding"}}
                upstream_conn.request(self.command, self.path, body=body, headers=headers)
                reply = upstream_conn.getresponse()
                data = reply.read()
                if action == "lose":
                    upstream_conn.close()
                    self._fail()
                    return
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    # A HEAD reply's length is the object's; other bodies are re-sent whole.
                    # (send_response wrote this server's own Date and Server.)
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(key, value)
                length = reply.getheader("Content-Length") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream_conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail_next(self, count: int) -> None:
        """Answer the next `count` requests with 503."""
        with self.lock:
            self.failures_left, self.failed = count, 0


@pytest.fixture
def flaky_s3(s3_server, restored_environ, monkeypatch):
    """The flaky proxy, set as this process's S3 endpoint."""
    proxy = FlakyS3Proxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.server.shutdown()


def test_transient_s3_errors_are_retried_up_to_the_configured_attempts(
    flaky_s3, s3_bucket, monkeypatch
):
    storage.s3_client().put_object(Bucket=s3_bucket, Key="blob", Body=b"payload")
    uri = f"s3://{s3_bucket}/blob"

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    flaky_s3.fail_next(2)
    assert storage.s3_client().get_object(Bucket=s3_bucket, Key="blob")["Body"].read() == b"payload"
    assert flaky_s3.failed == 2
    flaky_s3.fail_next(2)
    filesystem, path = storage.filesystem_for(uri)
    with filesystem.open_input_stream(path) as stream:
        assert stream.read() == b"payload"
    assert flaky_s3.failed == 2

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    flaky_s3.fail_next(1)
    with pytest.raises(ClientError, match="SlowDown|503"):
        storage.s3_client().get_object(Bucket=s3_bucket, Key="blob")
    flaky_s3.fail_next(1)
    filesystem, path = storage.filesystem_for(uri)
    with pytest.raises(OSError):
        filesystem.open_input_stream(path).read()


def test_a_replacement_that_fails_while_swapping_in_says_the_root_is_no_dataset(flaky_s3, s3_bucket, monkeypatch):
    """The one window a replacement cannot close: the store failing while the new shards are
    copied into place (after the old ones went). The error says so, and the root reads as no
    dataset rather than as a mix of the two."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    root = f"s3://{s3_bucket}/datasets/tiny"
    spec = SyntheticSpec(num_classes=4, images_per_class=3, image_size=16, modes_per_class=1)
    generate_synthetic(root, spec)
    flaky_s3.rule = lambda method, headers: "fail" if "x-amz-copy-source" in headers else None
    with pytest.raises(OSError, match=r"tiny: replacing the dataset failed part-way .* nothing reads it"):
        generate_synthetic(root, spec, overwrite=True)
    assert flaky_s3.failed == 1
    with pytest.raises(DatasetFormatError, match="metadata.json: no such file"):
        validate_dataset(root)


def test_a_filesystem_sent_to_a_ray_worker_keeps_its_retry_budget(flaky_s3, s3_bucket):
    # pyarrow's own pickling resets the retries to 3 attempts; the copy a Ray worker receives
    # (Ray Train's storage_filesystem) must keep the configured number in both directions.
    storage.s3_client().put_object(Bucket=s3_bucket, Key="blob", Body=b"payload")
    patient = pickle.loads(pickle.dumps(storage.S3FileSystem(flaky_s3.endpoint, max_attempts=5)))
    flaky_s3.fail_next(4)
    with patient.open_input_stream(f"{s3_bucket}/blob") as stream:
        assert stream.read() == b"payload"
    impatient = pickle.loads(pickle.dumps(storage.S3FileSystem(flaky_s3.endpoint, max_attempts=1)))
    flaky_s3.fail_next(1)
    with pytest.raises(OSError):
        impatient.open_input_stream(f"{s3_bucket}/blob").read()


@pytest.mark.ray
def test_ray_data_reads_of_s3_keep_the_retry_budget(
    flaky_s3, s3_server, s3_bucket, monkeypatch, ray_local
):
    # Ray Data lists and reads the files in its own tasks, with copies of the driver's
    # filesystem: with the project's, they keep the configured attempts (one Ray Data built
    # from the URIs would try 3 times, whatever the setting).
    from pipeline.data.ray_datasets import read_shards

    spec = SyntheticSpec(num_classes=2, images_per_class=2, image_size=16, modes_per_class=1)
    root = f"s3://{s3_bucket}/datasets/tiny"
    with monkeypatch.context() as direct:  # written straight to the server, read through the proxy
        direct.setenv("AWS_ENDPOINT_URL", s3_server)
        generate_synthetic(root, spec)
        expected = read_split(root, "test").column("id").to_pylist()

    def read(attempts: int, failures: int) -> list[int]:
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(attempts))
        dataset = read_shards(shard_uris(root, "test")).select_columns(["id"])
        flaky_s3.fail_next(failures)  # Ray Data's reads are lazy: they all start below
        return sorted(row["id"] for row in dataset.take_all())

    assert read(attempts=5, failures=4) == expected
    assert flaky_s3.failed == 4
    with pytest.raises(Exception, match="503"):
        read(attempts=1, failures=1)
    assert flaky_s3.failed == 1


def test_files_read_together_must_be_in_one_store(s3_env, s3_bucket, tmp_path):
    filesystem, paths = storage.filesystem_for_files([f"s3://{s3_bucket}/a", f"s3://{s3_bucket}/b/c"])
    assert isinstance(filesystem, storage.S3FileSystem)
    assert paths == [f"{s3_bucket}/a", f"{s3_bucket}/b/c"]
    for mixed in ([f"s3://{s3_bucket}/a", str(tmp_path / "b")], [f"s3://{s3_bucket}/a", "s3://other/b"]):
        with pytest.raises(ValueError, match="not in the same store"):
            storage.filesystem_for_files(mixed)


# ----------------------------------------------------------------------------- locks


def _lock_record(bucket: str, key: str) -> dict:
    return json.loads(storage.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())


def test_an_s3_lock_is_renewed_while_held_and_taken_over_once_its_holder_is_gone(s3_env, s3_bucket):
    """A 3 s lease: renewed, it keeps a second claimer out well past 3 s; its holder killed
    (nothing given back), it keeps them out until it lapses, then the claimer takes it."""
    import time

    from lock_holder import lock_held_elsewhere

    from pipeline import locks

    location, key = f"s3://{s3_bucket}/runs/.run-locks", "runs/.run-locks/r.lock"
    with lock_held_elsewhere(location, "r", lease_s=3, env={**os.environ}) as holder:
        time.sleep(4.5)
        with pytest.raises(ValueError, match=rf"^pid {holder.pid} on \S+ \(if that process is gone, "
                                             r"its lock lapses in [1-3] s\)$"):
            with locks.exclusive(location, "r", str):
                pass
        holder.kill()
        holder.wait()
        with pytest.raises(ValueError, match=rf"^pid {holder.pid} on "):  # not yet lapsed
            with locks.exclusive(location, "r", str):
                pass
        time.sleep(4.5)
        with locks.exclusive(location, "r", str, lease_s=30):  # lapsed: taken over
            assert _lock_record(s3_bucket, key)["holder"] == locks.holder_name()
    with pytest.raises(ClientError, match="NoSuchKey"):  # given back
        storage.s3_client().get_object(Bucket=s3_bucket, Key=key)


def _wait_for(condition, seconds: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_holder_whose_s3_lock_was_taken_says_so_and_leaves_the_new_holders_lock(s3_env, s3_bucket):
    from pipeline import locks

    warnings, key = [], "runs/.run-locks/r.lock"
    taker = json.dumps({"holder": "pid 1 on elsewhere", "lease_s": 60}).encode()
    with locks.exclusive(f"s3://{s3_bucket}/runs/.run-locks", "r", str, lease_s=1, warn=warnings.append):
        storage.s3_client().put_object(Bucket=s3_bucket, Key=key, Body=taker)  # as if it had lapsed
        _wait_for(lambda: warnings)
    assert warnings == [
        f"lost the lock s3://{s3_bucket}/{key} (now held by pid 1 on elsewhere; a lock not renewed for "
        "1 s may be taken over): another job may write beside this one"
    ]
    assert _lock_record(s3_bucket, key)["holder"] == "pid 1 on elsewhere"


def test_a_holder_that_cannot_renew_its_s3_lock_says_so_before_it_lapses(flaky_s3, s3_bucket):
    """Renewals failing with errors that are not conflicts (throttling, expired credentials):
    the lease is not known lost, but may soon be."""
    from pipeline import locks

    warnings, key = [], "runs/.run-locks/r.lock"
    with locks.exclusive(f"s3://{s3_bucket}/runs/.run-locks", "r", str, lease_s=2, warn=warnings.append):
        flaky_s3.rule = lambda method, headers: "fail" if method == "PUT" else None
        _wait_for(lambda: warnings)
        flaky_s3.rule = None
    assert len(warnings) == 1
    assert warnings[0].startswith(f"could not renew the lock s3://{s3_bucket}/{key} for ")
    assert warnings[0].endswith("after 2 s another job may take it over and write beside this one")
    with pytest.raises(ClientError, match="NoSuchKey"):  # given back once the store answered again
        storage.s3_client().get_object(Bucket=s3_bucket, Key=key)


def test_an_s3_lock_whose_reply_was_lost_is_still_this_processes(flaky_s3, s3_bucket, monkeypatch):
    """The create (and the takeover) landed but their replies were lost: botocore's retry
    then meets the lock object it wrote, which is this process's, not another's."""
    import time

    from pipeline import locks

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the one retry that matters (each backs off)

    key = "runs/.run-locks/r.lock"
    lost = []

    def lose_first(header):
        def rule(method, headers):
            if method == "PUT" and header in headers and not lost:
                lost.append(method)
                return "lose"
            return None
        return rule

    flaky_s3.rule = lose_first("If-None-Match")
    with locks.exclusive(f"s3://{s3_bucket}/runs/.run-locks", "r", str):
        assert lost and _lock_record(s3_bucket, key)["holder"] == locks.holder_name()
    with pytest.raises(ClientError, match="NoSuchKey"):
        storage.s3_client().get_object(Bucket=s3_bucket, Key=key)

    lapsed = json.dumps({"holder": "pid 1 on elsewhere", "lease_s": 0.001}).encode()
    storage.s3_client().put_object(Bucket=s3_bucket, Key=key, Body=lapsed)
    time.sleep(1.1)  # (the store's times are whole seconds)
    lost.clear()
    flaky_s3.rule = lose_first("If-Match")
    with locks.exclusive(f"s3://{s3_bucket}/runs/.run-locks", "r", str):
        assert lost and _lock_record(s3_bucket, key)["holder"] == locks.holder_name()


def test_an_s3_lock_that_cannot_be_taken_is_a_named_refusal_and_leaves_nothing(flaky_s3, s3_bucket, monkeypatch):
    """The store stops answering after the lock object was created (its check for conditional
    writes fails): a refusal naming the lock, and the object is deleted again."""
    from pipeline import locks

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # (each 503 is retried with backoff)

    creates = []

    def second_create_fails(method, headers):
        if method == "PUT" and "If-None-Match" in headers:
            creates.append(method)
            return "fail" if len(creates) > 1 else None
        return None

    flaky_s3.rule = second_create_fails
    with pytest.raises(ValueError, match=(
        rf"^s3://{s3_bucket}/runs/.run-locks/r.lock: could not take this lock: .*SlowDown"
    )):  # fmt: skip
        with locks.exclusive(f"s3://{s3_bucket}/runs/.run-locks", "r", str):
            pass
    flaky_s3.rule = None
    with pytest.raises(ClientError, match="NoSuchKey"):
        storage.s3_client().get_object(Bucket=s3_bucket, Key="runs/.run-locks/r.lock")


def test_a_file_uri_is_locked_as_its_path_is(tmp_path):
    from lock_holder import lock_held_elsewhere

    from pipeline import locks

    assert [locks.keeps_apart(where) for where in ("runs", f"file://{tmp_path}", "s3://b/runs", "gs://b/runs")] == [
        True, True, True, False]

    with lock_held_elsewhere(str(tmp_path), "r") as holder:
        with pytest.raises(ValueError, match=rf"^pid {holder.pid} on "):
            with locks.exclusive(f"file://{tmp_path}", "r", str):
                pass


def test_a_store_that_ignores_conditional_writes_is_named(flaky_s3, s3_bucket):
    from pipeline import locks

    flaky_s3.dropped_headers = {"if-none-match", "if-match"}
    warnings = []
    with locks.exclusive(f"s3://{s3_bucket}/locks", "r", str, warn=warnings.append):
        pass
    assert warnings == [
        f"s3://{s3_bucket} ignores conditional writes (If-None-Match): jobs given the same name are not "
        "kept apart there"
    ]
