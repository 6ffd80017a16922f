"""One process at a time per name under a storage location: the same training run or sweep
started twice would write into one checkpoint folder (or Tune experiment) and one MLflow record,
and two exports into one directory would write over each other's files.

- Local storage: an exclusive `flock` on a file. The system frees it when the holding process
  ends, however it ends (killed included), so a rerun after a crash is never locked out.
- `s3://` storage: a lease. The lock is an object created only if absent (a conditional put,
  `If-None-Match: *`); the holder rewrites it every `lease_s / 4` seconds, each time only if it
  is still its own (`If-Match` with its ETag). A lock not rewritten for `lease_s` seconds, by
  the store's clock, belongs to a process that is gone (killed, its node lost): the next
  claimer takes it over with a conditional put of its own, so of two claimers one wins. The
  holder deletes it when done. A store that ignores conditional writes is found out on taking
  the lock, and said so, rather than trusted.
- Other object stores (`gs://`, ...): no lock; pyarrow offers no conditional write there.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

LEASE_S = 60.0
"""How long an `s3://` lock outlives its holder's last renewal (renewed every quarter of it)."""


def holder_name() -> str:
    """This process, as a lock names its holder."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def keeps_apart(location: str) -> bool:
    """Whether `exclusive` keeps processes apart under `location` (a local path, `file://` or
    `s3://`; not other object stores)."""
    return "://" not in location or urlsplit(location).scheme in ("file", "s3")


def lock_file(location: str, name: str) -> str | None:
    """The file `exclusive(location, name, ...)` locks when `location` is local (a path or
    file://); None for object stores."""
    if "://" in location and urlsplit(location).scheme != "file":
        return None
    return str(Path(urlsplit(location).path if "://" in location else location) / f"{name}.lock")


@contextlib.contextmanager
def exclusive(location: str, name: str, busy: Callable[[str], str], *, lease_s: float = LEASE_S,
              warn=None) -> Iterator[None]:
    """Hold lock `name` under `location` (a folder, local or URI) for the `with` block.

    When another process holds it: ValueError(busy(holder)), `holder` naming that process (and,
    on an object store, when its lock lapses); when the store refuses or does not answer, a
    ValueError naming the lock object. `warn` (default: print to stderr) hears of a lease that
    cannot be renewed or was lost, or of a store that ignores conditional writes; the block
    goes on either way."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
    if not keeps_apart(location):
        yield
    elif urlsplit(location).scheme == "s3":
        with _s3_lease(location, name, busy, lease_s, warn):
            yield
    else:
        with _file_lock(Path(lock_file(location, name)), busy):
            yield


@contextlib.contextmanager
def _file_lock(path: Path, busy) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:  # noqa: PTH123 - a lock file
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise ValueError(busy(handle.read().strip() or "another process")) from None
        handle.seek(0)
        handle.truncate()
        handle.write(holder_name())
        handle.flush()
        yield  # the lock goes with the file's closing (it stays: unlinking it would race)


def _status(err: Exception) -> int | None:
    """The HTTP status of a failed S3 request (None for other errors)."""
    response = getattr(err, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


# 412: the condition did not hold; 409: a conditional write raced another (AWS: read, retry);
# 404: an If-Match on an object deleted meanwhile.
_LOST_RACE = (412, 409, 404)


class _Lease:
    """An `s3://` lock object this process holds: its ETag, rewritten by a renewing thread.

    Every request may have been carried out by the store even when its reply was lost (and
    then retried by botocore, which sees its own first attempt as a conflict): a lock object
    that holds this lease's token is this lease's, whatever a reply said."""

    def __init__(self, client, renewer, bucket: str, key: str, lease_s: float, warn):
        self.client, self.bucket, self.key, self.lease_s, self.warn = client, bucket, key, lease_s, warn
        self.renewer = renewer
        """The client of renewals: one quick try each (the next renewal is the retry), so that a
        store that does not answer is noticed while the lease still runs."""
        self.token = uuid.uuid4().hex
        self.body = json.dumps({"holder": holder_name(), "token": self.token, "lease_s": lease_s}).encode()
        self.etag = ""
        self.renewed = 0.0
        """time.monotonic() of the last write known to have been carried out."""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew, name=f"lease {key}", daemon=True)

    @property
    def where(self) -> str:
        """The lock object's URI."""
        return f"s3://{self.bucket}/{self.key}"

    def put(self, client=None, **condition) -> None:
        """Write the lock object under `condition` (IfNoneMatch / IfMatch)."""
        client = client or self.client
        self.etag = client.put_object(Bucket=self.bucket, Key=self.key, Body=self.body, **condition)["ETag"]
        self.renewed = time.monotonic()

    def read(self):
        """(holder's record, ETag, seconds since its last write by the store's clock), or None
        when there is no lock object."""
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        now = email.utils.parsedate_to_datetime(reply["ResponseMetadata"]["HTTPHeaders"]["date"])
        if now.tzinfo is None:  # "-0000": UTC, as HTTP dates are
            now = now.replace(tzinfo=datetime.timezone.utc)
        try:
            record = json.loads(reply["Body"].read())
        except ValueError:
            record = {}
        return record, reply["ETag"], (now - reply["LastModified"]).total_seconds()

    def adopt(self, found) -> bool:
        """Whether the lock object `found` (a `read`) is this lease's; if so, take its ETag."""
        if found is None or found[0].get("token") != self.token:
            return False
        self.etag, self.renewed = found[1], time.monotonic()
        return True

    def acquire(self, busy) -> None:
        """Create the lock object, or take over one that lapsed; ValueError(busy(holder)) when
        another process holds it."""
        for _ in range(5):  # each turn lost a race to another claimer or a finishing holder
            try:
                self.put(IfNoneMatch="*")
                return
            except Exception as err:
                if _status(err) not in (412, 409):
                    raise
            found = self.read()
            if found is None:  # deleted since: its holder just finished
                continue
            if self.adopt(found):
                return
            record, etag, age = found
            if age < float(record.get("lease_s", self.lease_s)):
                raise ValueError(busy(_describe(record, age, self.lease_s)))
            try:  # lapsed: take it over, unless another claimer did first
                self.put(IfMatch=etag)
                return
            except Exception as err:
                if _status(err) not in _LOST_RACE:
                    raise
                if self.adopt(self.read()):
                    return
        found = self.read()
        raise ValueError(busy(_describe(found[0], found[2], self.lease_s) if found else "another process"))

    def ignores_conditions(self) -> bool:
        """Whether the store lets a second create of the lock object through."""
        try:
            self.put(IfNoneMatch="*")
        except Exception as err:
            if _status(err) not in (412, 409):
                raise
            return False
        return True

    def release(self) -> None:
        """Delete the lock object if it is still this lease's. Lost, or the store unreachable:
        it is left, and lapses on its own."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as err:  # noqa: BLE001 - see above
            if _status(err) == 404:
                return
            # A store without conditional deletes, or an ETag this lease did not see: delete
            # what is still this lease's (a takeover in between needs it lapsed).
            with contextlib.suppress(Exception):
                if self.adopt(self.read()):
                    self.client.delete_object(Bucket=self.bucket, Key=self.key)

    def _renew(self) -> None:
        warned = False
        while not self.stop.wait(self.lease_s / 4):
            try:
                self.put(self.renewer, IfMatch=self.etag)
                warned = False
                continue
            except Exception as err:  # noqa: BLE001 - retried next time; said once it matters
                if self.stop.is_set():  # a renewal that raced the release
                    return
                status, error = _status(err), err
            try:
                found = self.read() if status in (412, 404) else None
            except Exception as err:  # noqa: BLE001
                found, status, error = None, None, err
            if status in (412, 404) and not self.adopt(found):
                now = f"now held by {found[0].get('holder', 'another process')}" if found else "deleted"
                self.warn(f"lost the lock {self.where} ({now}; a lock not renewed for {self.lease_s:g} s "
                          "may be taken over): another job may write beside this one")
                return
            stale = time.monotonic() - self.renewed
            if not warned and status not in (412, 404) and stale > self.lease_s / 2:
                warned = True
                self.warn(f"could not renew the lock {self.where} for {stale:.0f} s ({error}); after "
                          f"{self.lease_s:g} s another job may take it over and write beside this one")


def _describe(record: dict, age: float, lease_s: float) -> str:
    holder = record.get("holder", "another process")
    left = max(0.0, float(record.get("lease_s", lease_s)) - age)
    return f"{holder} (if that process is gone, its lock lapses in {left:.0f} s)"


@contextlib.contextmanager
def _s3_lease(location: str, name: str, busy, lease_s: float, warn) -> Iterator[None]:
    from pipeline.storage import s3_client

    parts = urlsplit(location)
    lease = _Lease(s3_client(), s3_client(attempts=1, timeout_s=max(1.0, lease_s / 8)), parts.netloc,
                   f"{parts.path.strip('/')}/{name}.lock".lstrip("/"), lease_s, warn)
    acquired = False
    try:
        lease.acquire(busy)
        acquired = True
        ignores = lease.ignores_conditions()
    except Exception as err:
        if acquired:
            lease.release()
        if isinstance(err, ValueError):
            raise
        # The store refused, or could not be reached: named, as a refusal.
        raise ValueError(f"{lease.where}: could not take this lock: {err}") from err
    if ignores:
        warn(f"{parts.scheme}://{parts.netloc} ignores conditional writes (If-None-Match): "
             f"jobs given the same name are not kept apart there")
    try:
        lease.thread.start()
        yield
    finally:
        lease.stop.set()
        try:
            if lease.thread.is_alive():  # a renewal in flight ends with its request's retries
                lease.thread.join(timeout=lease_s / 4)
        finally:
            lease.release()
