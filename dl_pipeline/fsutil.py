"""Path handling for Hadoop-style URIs (file:, s3a:, hdfs:, dbfs:) from Python code.

Spark reads and writes the data itself; these helpers cover the small files Python touches
(manifest, model bundle, summaries) and are usable on executors, where there is no JVM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from typing import Any
from urllib.parse import urlparse

import fsspec

from dl_pipeline.errors import UserError


def to_url(path: str) -> str:
    """Plain local paths -> absolute ``file://`` URLs (what Petastorm and Spark expect)."""
    if not path:
        return path
    scheme = urlparse(path).scheme
    if scheme in ("", "file"):
        local = path[len("file:"):] if path.startswith("file:") else path
        local = "/" + local.lstrip("/") if path.startswith("file:") else os.path.abspath(local)
        return "file://" + os.path.abspath(local)
    return path


def _fsspec_url(url: str) -> str:
    # s3a/s3n are Hadoop names for s3; on Databricks dbfs:/x is mounted at /dbfs/x.
    scheme = urlparse(url).scheme
    if scheme in ("s3a", "s3n"):
        return "s3" + url[len(scheme):]
    if scheme == "dbfs":
        return "/dbfs/" + url[len("dbfs:"):].lstrip("/")
    return url


def fs_and_path(url: str):
    fs, path = fsspec.core.url_to_fs(_fsspec_url(to_url(url)))
    return fs, path


def filesystem_error(url: str) -> str | None:
    """Why Python cannot reach ``url``'s filesystem (e.g. s3fs not installed, unknown scheme),
    in one line, or None when it can."""
    try:
        fs_and_path(url)
    except (ImportError, ValueError, OSError) as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def local_path(url: str) -> str | None:
    """The local filesystem path for a file:// URL, else None."""
    u = to_url(url)
    return u[len("file://"):] if u.startswith("file://") else None


def read_text(url: str) -> str:
    fs, path = fs_and_path(url)
    with fs.open(path, "r", encoding="utf-8") as fh:
        return fh.read()


def write_text_atomic(url: str, text: str) -> None:
    """Write via a temp file then rename, so readers never see half a file."""
    fs, path = fs_and_path(url)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    fs.mv(tmp, path)


@contextlib.contextmanager
def exclusive_lock(url: str, owner: dict[str, Any], describe: str, stale_after_s: float = 0):
    """Hold the lock file ``url`` (created exclusively; its JSON names ``owner``) for the block.

    Held by another run: UserError naming the holder, unless that holder is a process of this
    host that no longer exists (killed with no clean-up), or, with ``stale_after_s``, its
    ``started`` (ISO time) is older than that: a run lost with its machine (a job cluster's driver)
    leaves its lock behind, and a scheduler's retry runs elsewhere. Either is taken over.
    ``describe`` names what the lock guards, for the message. Removed on exit, also after an exception."""
    fs, path = fs_and_path(url)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    doc = json.dumps({**owner, "host": socket.gethostname(), "pid": os.getpid()})
    for _ in range(2):
        try:
            with fs.open(path, "xb") as fh:  # exclusive: fails when the file exists
                fh.write(doc.encode("utf-8"))
            break
        except FileExistsError:
            try:
                holder = json.loads(read_text(url))
            except (OSError, ValueError):
                holder = {}
            dead = holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0)))
            if dead or (stale_after_s and _age_s(holder.get("started")) > stale_after_s):
                fs.rm(path)  # its run was killed or lost; the outputs it was replacing kept their previous state
                continue
            raise UserError(f"{describe} is running already (lock {url}: {holder.get('host', '?')} pid {holder.get('pid', '?')}, "
                            f"started {holder.get('started', '?')}); wait for it, or delete the lock if that run is gone") from None
    else:
        raise UserError(f"{describe}: could not take the lock {url}; try again")
    try:
        yield
    finally:
        fs.rm(path)


def _age_s(started: Any) -> float:
    """Seconds since an ISO time with a zone (a lock's ``started``); 0 when it cannot be read."""
    import datetime as dt

    try:
        return (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(str(started))).total_seconds()
    except (TypeError, ValueError):
        return 0.0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sha256_and_size(url: str, stop=None) -> tuple[str, int]:
    """-> (hex SHA-256, bytes) of the file at ``url``. ``stop``: a threading.Event; once set,
    the reading stops (InterruptedError)."""
    fs, path = fs_and_path(url)
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            if stop is not None and stop.is_set():
                raise InterruptedError(f"{url}: checksum stopped")
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def spark_skips(name: str) -> bool:
    """Does Spark's file source skip a file of this name in a folder: ``.`` names, ``_`` names
    unless they hold ``=`` (partition-like), and files still being copied (``._COPYING_``)."""
    return (name.startswith("_") and "=" not in name) or name.startswith(".") or name.endswith("._COPYING_")


def expand(url: str) -> list[str]:
    """A file, a directory (its files) or a glob -> sorted file URLs."""
    fs, path = fs_and_path(url)
    if fs.isdir(path):
        files = [p for p in fs.find(path) if not spark_skips(os.path.basename(p))]
    else:
        files = fs.glob(path) if any(c in path for c in "*?[") else ([path] if fs.exists(path) else [])
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return sorted(to_url(p) if proto in ("file", "local") else f"{proto}://{p}" for p in files)
