"""Storage: atomic writes (also when the writer is SIGKILLed), hashes, memory:// and a real S3 server."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from archipelago import storage
from archipelago.errors import StorageError


@pytest.mark.parametrize("kind", ["plain", "file", "memory"])
def test_roundtrip_and_hash(tmp_path, kind):
    base = {"plain": str(tmp_path), "file": f"file://{tmp_path}", "memory": "memory://archtest"}[kind]
    url = storage.join(base, "a", "b.bin")
    digest = storage.write_bytes(url, b"hello")
    assert digest == hashlib.sha256(b"hello").hexdigest() == storage.sha256_url(url)
    assert storage.read_bytes(url) == b"hello" and storage.exists(url)
    storage.write_json(storage.join(base, "a", "m.json"), {"x": 1})
    assert storage.read_json(storage.join(base, "a", "m.json")) == {"x": 1}
    assert storage.listdir(storage.join(base, "a")) == ["b.bin", "m.json"]
    # no temp files left behind
    assert not [n for n in storage.listdir(storage.join(base, "a")) if n.endswith(".tmp")]


def test_missing_is_one_line(tmp_path):
    with pytest.raises(StorageError, match="not found") as ei:
        storage.read_bytes(str(tmp_path / "nope.bin"))
    assert "\n" not in str(ei.value)


def test_failed_write_leaves_old_content(tmp_path, monkeypatch):
    url = str(tmp_path / "x.bin")
    storage.write_bytes(url, b"old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(StorageError):
        storage.write_bytes(url, b"new" * 1000)
    assert storage.read_bytes(url) == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


@pytest.mark.e2e
def test_sigkill_during_write_leaves_no_partial_file(tmp_path):
    """A real writer process killed mid-write: the destination never appears half-written."""
    dst = tmp_path / "big.bin"
    code = textwrap.dedent(f"""
        from archipelago import storage
        storage.write_bytes({str(dst)!r}, b"x" * (1536 * 1024 * 1024))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".big.bin.*.tmp")):
        time.sleep(0.002)
    assert list(tmp_path.glob(".big.bin.*.tmp")), "writer never created its temp file"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dst.exists(), "destination exists after the writer was killed mid-write"


@pytest.mark.e2e
def test_s3_roundtrip_on_real_server(s3_env):
    url = storage.join(s3_env, "run", "artifact.bin")
    payload = os.urandom(100_000)
    digest = storage.write_bytes(url, payload)
    assert storage.read_bytes(url) == payload and storage.sha256_url(url) == digest
    assert storage.exists(url) and storage.listdir(storage.join(s3_env, "run")) == ["artifact.bin"]
    storage.remove(url)
    assert not storage.exists(url)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_unreachable_s3_endpoint(monkeypatch):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETVALUE42")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecretvalue99")
    t0 = time.time()
    with pytest.raises(StorageError) as ei:
        storage.write_bytes("s3://bucket/x.bin", b"data")
    msg = str(ei.value)
    assert time.time() - t0 < 60
    assert "cannot reach the store" in msg and "s3://bucket/x.bin" in msg and "\n" not in msg
    assert "supersecretvalue99" not in msg and "AKIDSECRETVALUE42" not in msg
    s3fs.S3FileSystem.clear_instance_cache()
