"""One way to read and write artifacts anywhere: every path is an fsspec URL (plain path, file://, s3://,
memory://). Writes are atomic (temp + rename locally; a single PUT on S3, which is all-or-nothing), every
write returns the sha256 of what was written, and S3 endpoint/credentials come only from the environment
and never appear in messages."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec

from archipelago.errors import StorageError
from archipelago.redact import redact  # storage.redact is the name callers use


def _s3_options() -> dict[str, Any]:
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    # Fail fast on an unreachable endpoint instead of retrying for minutes.
    opts["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2}}
    return opts


def scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fs, path-within-fs) for a URL; S3 options come from the environment."""
    kw = _s3_options() if scheme(url) in ("s3", "s3a") else {}
    try:
        fs, path = fsspec.core.url_to_fs(url, **kw)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{url}: unsupported storage URL ({exc})") from None
    return fs, path


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def is_local(url: str) -> bool:
    return scheme(url) == "file"


def local_path(url: str) -> Path:
    """Filesystem path of a local URL (plain path or file://)."""
    if not is_local(url):
        raise StorageError(f"{url}: expected a local path")
    return Path(url.removeprefix("file://"))


@contextlib.contextmanager
def _errors(url: str, action: str) -> Iterator[None]:
    """Map backend exceptions to one StorageError line with no credentials in it."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        if "NoSuchBucket" in str(exc) or "bucket does not exist" in str(exc):  # s3fs maps NoSuchBucket here
            raise StorageError(f"{url}: cannot {action}: bucket does not exist; create it or fix the URL") from None
        raise StorageError(f"{url}: not found while trying to {action}") from None
    except PermissionError as exc:
        raise StorageError(redact(f"{url}: permission denied while trying to {action} ({exc}); "
                                  "check the credentials in the environment")) from None
    except Exception as exc:  # noqa: BLE001 - backends raise anything (botocore, aiohttp, OSError)
        name = type(exc).__name__
        text = str(exc)
        if any(k in text for k in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")):
            hint = "the store rejected the credentials; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        elif any(k in name + text for k in ("EndpointConnectionError", "ConnectTimeout", "Connect", "ClientConnector",
                                             "Could not connect", "Connection refused")):
            hint = "cannot reach the store; check AWS_ENDPOINT_URL and that the server is up"
        elif "NoSuchBucket" in text:
            hint = "bucket does not exist; create it or fix the URL"
        else:
            hint = f"{name}: {text.splitlines()[0] if text else ''}"
        raise StorageError(redact(f"{url}: cannot {action}: {hint}")) from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _place_local(dst: Path, data: bytes, place: Any) -> None:
    """Write a complete, fsynced temp file beside `dst`, then `place(tmp, dst)` it (os.replace: overwrite;
    os.link: only if `dst` does not exist) and drop the temp name."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        place(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes(url: str, data: bytes) -> str:
    """Atomically write `data` to `url`; returns its sha256.

    Local: temp file in the same directory, fsync, os.replace (readers never see a partial file).
    S3: one PUT (objects appear whole or not at all). Other fsspec backends: temp key, then move.
    """
    digest = sha256_bytes(data)
    with _errors(url, "write"):
        if is_local(url):
            _place_local(local_path(url), data, os.replace)
        else:
            fs, path = filesystem(url)
            if scheme(url) in ("s3", "s3a"):
                fs.pipe_file(path, data)
            else:
                parent = path.rsplit("/", 1)[0] if "/" in path else ""
                if parent:
                    fs.makedirs(parent, exist_ok=True)
                tmp = f"{path}.{uuid.uuid4().hex}.tmp"
                fs.pipe_file(tmp, data)
                fs.mv(tmp, path)
    return digest


def create_exclusive(url: str, data: bytes) -> bool:
    """Write `data` to `url` only if nothing is there; False if it exists. Atomic where the store allows:
    locally a complete temp file hard-linked into place (link() fails if the name exists); on S3 a
    conditional PUT (If-None-Match: *; AWS S3, MinIO and moto >= 5 honour it — a store that ignores the
    header would overwrite, see SECURITY.md). Other fsspec stores: check, then write (not atomic)."""
    with _errors(url, "create"):
        if is_local(url):
            try:
                _place_local(local_path(url), data, os.link)
                return True
            except FileExistsError:
                return False
        fs, path = filesystem(url)
        if scheme(url) in ("s3", "s3a"):
            try:
                fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def read_bytes(url: str) -> bytes:
    with _errors(url, "read"):
        if is_local(url):
            return local_path(url).read_bytes()
        fs, path = filesystem(url)
        return fs.cat_file(path)


def write_text(url: str, text: str) -> str:
    return write_bytes(url, text.encode())


def read_text(url: str) -> str:
    return read_bytes(url).decode()


def write_json(url: str, obj: Any) -> str:
    return write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str) -> Any:
    data = read_bytes(url)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StorageError(f"{url}: not valid JSON ({exc.__class__.__name__}); the file is corrupt or "
                           "not one of ours") from None


def exists(url: str) -> bool:
    with _errors(url, "check"):
        if is_local(url):
            return local_path(url).exists()
        fs, path = filesystem(url)
        return fs.exists(path)


def listdir(url: str) -> list[str]:
    """Names (not URLs) directly under `url`; empty if it does not exist."""
    with _errors(url, "list"):
        if is_local(url):
            p = local_path(url)
            return sorted(x.name for x in p.iterdir()) if p.is_dir() else []
        fs, path = filesystem(url)
        if not fs.exists(path):
            return []
        return sorted(x.rstrip("/").rsplit("/", 1)[-1] for x in fs.ls(path, detail=False))


def remove(url: str, recursive: bool = False) -> None:
    with _errors(url, "remove"):
        fs, path = filesystem(url)
        if fs.exists(path):
            fs.rm(path, recursive=recursive)


def sha256_url(url: str) -> str:
    return sha256_bytes(read_bytes(url))


def ensure_reachable(url: str) -> None:
    """Touch the store once so an unreachable endpoint fails here with one line, not deep in a job."""
    with _errors(url, "access the store"):
        if is_local(url):
            return
        fs, path = filesystem(url)
        fs.exists(path)


def upload_dir(local_dir: Path, url: str) -> dict[str, str]:
    """Copy every file under local_dir to url (each atomically); returns {relative path: sha256}."""
    out: dict[str, str] = {}
    for f in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        rel = f.relative_to(local_dir).as_posix()
        out[rel] = write_bytes(join(url, rel), f.read_bytes())
    return out


def download_dir(url: str, local_dir: Path) -> None:
    """Copy every file under url into local_dir (recursive)."""
    with _errors(url, "download"):
        fs, path = filesystem(url)
        for f in fs.find(path):
            rel = f[len(path.rstrip("/")) + 1:]
            dst = Path(local_dir) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(fs.cat_file(f))
