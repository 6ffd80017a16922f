"""Object storage: one place that turns a path or URI into a filesystem, for every reader and
writer in the pipeline (datasets, checkpoints, pretrained weights, MLflow artifacts).

Credentials come from the standard AWS chain only (environment, `AWS_PROFILE` and
~/.aws/credentials, instance or pod roles) and are never read, copied or logged here. The
endpoint of an S3-compatible store (MinIO, Ceph, ...) and the retry budget are settings: the
config section `storage`, else the standard variables `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`
and `AWS_MAX_ATTEMPTS`. `export_settings` writes the config's values into those variables, so
the driver's own code, boto3 and MLflow all see the same endpoint (`exported_settings` does it
for one `with` block only), and `worker_env_vars` hands
the same variables to Ray workers. Ray Data reads through `filesystem_for_files`, whose
filesystem keeps the retry budget in the copies its read tasks get.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipeline.config.settings import StorageConfig

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
S3_ENDPOINT_ENV = "AWS_ENDPOINT_URL_S3"  # AWS's service-specific variable wins over the global one
MAX_ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"
RETRY_MODE_ENV = "AWS_RETRY_MODE"
MLFLOW_ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"

WORKER_ENV = (S3_ENDPOINT_ENV, ENDPOINT_ENV, MAX_ATTEMPTS_ENV, RETRY_MODE_ENV, MLFLOW_ENDPOINT_ENV)
"""The variables Ray workers need to reach the same store; none of them holds a secret."""

DEFAULT_MAX_ATTEMPTS = StorageConfig().s3_max_attempts


# ----------------------------------------------------------------------------- settings


def s3_endpoint_url() -> str:
    """The S3 endpoint this process uses ("" = AWS itself)."""
    return os.environ.get(S3_ENDPOINT_ENV) or os.environ.get(ENDPOINT_ENV) or ""


def _endpoint_source() -> str:
    name = S3_ENDPOINT_ENV if os.environ.get(S3_ENDPOINT_ENV) else ENDPOINT_ENV
    return f"environment variable {name}"


def s3_max_attempts() -> int:
    """Attempts per S3 request (the first try and its retries) this process uses."""
    text = os.environ.get(MAX_ATTEMPTS_ENV, "")
    try:
        attempts = int(text) if text else DEFAULT_MAX_ATTEMPTS
    except ValueError:
        raise ValueError(f"{MAX_ATTEMPTS_ENV}={text!r}: expected a positive integer") from None
    if attempts < 1:
        raise ValueError(f"{MAX_ATTEMPTS_ENV}={text!r}: expected a positive integer")
    return attempts


def check_endpoint_url(url: str, where: str) -> None:
    """Raise ValueError naming `where` unless `url` is http(s)://host[:port] without credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}: {url!r} is not an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError(
            f"{where}: the URL carries credentials (user:password@); give them through the AWS "
            "environment or a profile instead, so they never reach logs or MLflow"
        )


def check_uri(uri: str, where: str) -> None:
    """Raise ValueError naming `where` if a URI carries credentials (s3://KEY:SECRET@...)."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError(
            f"{where}: the URI carries credentials (...@); pass them through the environment "
            "instead (AWS: credentials or AWS_PROFILE; MLflow: MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD), so they never reach logs or MLflow"
        )


_URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")
"""Schemes pyarrow reads: a location that starts with one and a colon is meant as a URI."""
_SCHEME = re.compile(rf"^({'|'.join(_URI_SCHEMES)}):(/*)(.*)$")


def check_location(location: str, where: str) -> None:
    """Raise ValueError naming `where` if a storage location is a mistyped URI: a scheme with
    other than two slashes (`s3:/bucket`, which pyarrow would take for a local folder named
    's3:'), or `s3://` with no bucket. A local path with a colon (`runs-12:30`) is a path."""
    match = _SCHEME.match(location)
    if match is None:
        return
    scheme, slashes, rest = match.groups()
    if scheme == "file":  # file:///abs/path: three slashes, the host left empty
        if slashes != "///":
            raise ValueError(f"{where}: {location!r} is not a file URI; did you mean 'file:///{rest}'?")
        return
    if slashes != "//":
        raise ValueError(f"{where}: {location!r} is neither a path nor a URI; did you mean "
                         f"'{scheme}://{rest}'?")
    if not rest.split("/", 1)[0]:
        raise ValueError(f"{where}: {location!r} names no bucket ({scheme}://BUCKET/prefix)")


def check_settings(config) -> None:
    """Check the run's storage URIs and `storage` section without touching the environment;
    raises ValueError naming the field (config validation turns it into a ConfigError)."""
    for where, uri in (
        ("data.root", config.data.root),
        ("data.cache_dir", config.data.cache_dir),
        ("train.storage_path", config.train.storage_path),
        ("model.pretrained", config.model.pretrained),
        ("tracking.tracking_uri", config.tracking.tracking_uri),
    ):
        check_uri(uri, where)
        if where != "tracking.tracking_uri":  # MLflow's own URI forms (sqlite:///...) vary
            check_location(uri, where)
    settings = config.storage
    if settings.s3_max_attempts < 1:
        raise ValueError(f"storage.s3_max_attempts: must be >= 1, got {settings.s3_max_attempts}")
    if settings.s3_endpoint_url:
        check_endpoint_url(settings.s3_endpoint_url, "storage.s3_endpoint_url")


def export_settings(config) -> dict[str, str]:
    """Check the run's storage settings (`check_settings`), then write the S3 settings into this
    process's environment (where pyarrow, boto3 and MLflow read them); returns the variables
    Ray workers need (`worker_env_vars`). Raises ValueError naming the field."""
    check_settings(config)
    settings = config.storage
    if settings.s3_endpoint_url:
        # The S3-only variable: it wins over AWS_ENDPOINT_URL in pyarrow and botocore alike, and
        # leaves the endpoints of other AWS services (STS for roles) alone.
        os.environ[S3_ENDPOINT_ENV] = settings.s3_endpoint_url
    elif s3_endpoint_url():
        check_endpoint_url(s3_endpoint_url(), _endpoint_source())
    if s3_endpoint_url():
        os.environ[MLFLOW_ENDPOINT_ENV] = s3_endpoint_url()
    os.environ[MAX_ATTEMPTS_ENV] = str(settings.s3_max_attempts)
    os.environ[RETRY_MODE_ENV] = "standard"  # botocore's (and so MLflow's) exponential backoff
    return worker_env_vars()


@contextlib.contextmanager
def exported_settings(config):
    """`export_settings` for the length of a `with` block: the S3 variables are put back as
    they were on leaving it, so a library caller (a notebook, a test, a sweep run in-process)
    does not inherit one run's endpoint. Yields `worker_env_vars`."""
    before = {name: os.environ.get(name) for name in WORKER_ENV}
    try:
        yield export_settings(config)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def store_errors_named(where: str):
    """An OSError inside the block (an unreachable store, an unreadable file: pyarrow's message
    names which) becomes a ValueError that names the argument or setting `where`, which the
    jobs print as `error: ...` before Ray starts, not as a traceback."""
    try:
        yield
    except FileExistsError:  # the jobs' own refusals of an output that is there
        raise
    except OSError as err:
        raise ValueError(f"{where}: {err}") from err


def worker_env_vars() -> dict[str, str]:
    """The S3 settings of this process, for a Ray `runtime_env`'s env_vars (no credentials)."""
    return {name: os.environ[name] for name in WORKER_ENV if os.environ.get(name)}


# ----------------------------------------------------------------------------- filesystems


class S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with the endpoint and standard retries, which survive pickling.

    pyarrow's own pickling drops `retry_strategy` (a copy sent to a Ray worker would fall back
    to 3 attempts), so a copy is rebuilt from the same arguments instead.
    """

    def __init__(self, endpoint_url: str = "", max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 region: str = ""):  # fmt: skip
        options = {}
        if endpoint_url:
            parts = urlsplit(endpoint_url)
            options = {"endpoint_override": parts.netloc + parts.path.rstrip("/"), "scheme": parts.scheme}
        if region:
            options["region"] = region
        super().__init__(
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **options
        )
        self.endpoint_url = endpoint_url
        self.max_attempts = max_attempts

    def __reduce__(self):
        return S3FileSystem, (self.endpoint_url, self.max_attempts, self.region)


@functools.lru_cache(maxsize=64)
def _aws_bucket_region(bucket: str) -> str:
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:  # no such bucket, or AWS out of reach: the configured region decides
        return ""


def s3_filesystem(bucket: str = "") -> S3FileSystem:
    """An S3 filesystem with this process's endpoint and retry settings (in `bucket`'s region)."""
    endpoint = s3_endpoint_url()
    if endpoint:
        check_endpoint_url(endpoint, _endpoint_source())
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
    if bucket and not endpoint:
        # As FileSystem.from_uri does: AWS answers a request in the wrong region with a redirect
        # that the C++ SDK does not follow. (S3-compatible stores accept any region.)
        region = _aws_bucket_region(bucket) or region
    return S3FileSystem(endpoint, s3_max_attempts(), region)


def normalize_location(location: str) -> str:
    """One spelling per location, so that `s3://b/runs/` and `s3://b/runs`, or `./runs` and
    `runs`, name the same run (run names hash the config): a URI loses its trailing slashes, a
    local path is normalised (`os.path.normpath`, still relative); "" (unset) stays ""."""
    if not location:
        return location
    if "://" in location:
        stripped = location.rstrip("/")
        return stripped if "://" in stripped else location  # file:/// is a root, not a prefix
    return os.path.normpath(location)


def absolute_location(location: str | os.PathLike[str]) -> str:
    """A location another process can use: a URI as given (`normalize_location`), a local
    path made absolute against this process's working directory (Tune trials and Ray workers
    run in other directories)."""
    text = os.fspath(location)
    if "://" in text:
        return normalize_location(text)
    return str(Path(text).resolve())


def filesystem_for(path_or_uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, an `s3://` URI (endpoint and retries from
    the settings) or any other URI pyarrow understands (`file://`, `gs://`, ...). A mistyped URI
    (`s3:/bucket`, which would be a local folder named 's3:') raises ValueError."""
    text = os.fspath(path_or_uri)
    check_location(text, "location")
    if "://" not in text:
        return pafs.LocalFileSystem(), os.path.abspath(text)
    scheme, rest = text.split("://", 1)
    if scheme == "s3":
        check_uri(text, "an s3:// URI")
        path = rest.split("?", 1)[0].rstrip("/")
        if not path:
            raise ValueError(f"{text}: an s3:// URI needs a bucket")
        return s3_filesystem(path.split("/", 1)[0]), path
    return pafs.FileSystem.from_uri(text)


def check_file_exists(uri: str, where: str) -> None:
    """Raise ValueError naming `where` unless `uri` (a local path or URI) is a file; an
    unreachable store raises pyarrow's OSError, which names the bucket and key."""
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ValueError(f"{where}: no file at {uri}")


def filesystem_for_files(paths_or_uris) -> tuple[pafs.FileSystem, list[str]]:
    """One filesystem for files in one store (all local, or all in one bucket) and their paths
    inside it: what `ray.data.read_parquet(paths, filesystem=...)` wants. Ray Data would
    otherwise build its own S3 filesystem from the URIs, with pyarrow's default retries."""
    items = [os.fspath(p) for p in paths_or_uris]
    if not items:
        raise ValueError("no files to read")
    filesystem, first = filesystem_for(items[0])
    paths = [first]
    for item in items[1:]:
        other, path = filesystem_for(item)
        if other.type_name != filesystem.type_name or (
            isinstance(filesystem, S3FileSystem) and path.split("/", 1)[0] != first.split("/", 1)[0]
        ):
            raise ValueError(f"{item}: not in the same store as {items[0]}")
        paths.append(path)
    return filesystem, paths


def s3_client(*, attempts: int = 0, timeout_s: float = 0.0):
    """A boto3 S3 client with this process's endpoint and standard-mode retries (backoff):
    `attempts` tries per request (0: the configured budget) and, when given, `timeout_s` to
    connect and to read."""
    import boto3
    from botocore.config import Config

    timeouts = {"connect_timeout": timeout_s, "read_timeout": timeout_s} if timeout_s else {}
    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint_url() or None,
        # total_max_attempts counts the first try, as AWS_MAX_ATTEMPTS and pyarrow do
        # (botocore's max_attempts would count retries only).
        config=Config(retries={"mode": "standard", "total_max_attempts": attempts or s3_max_attempts()},
                      **timeouts),
    )
