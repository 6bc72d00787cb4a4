"""Shared fixtures: a real moto S3 server on 127.0.0.1, and CI strictness (a skipped test fails in CI:
a real test that silently skips because a dependency is missing would hide a broken install)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# 2-core CI: torch's default intra-op threads fight the test runner and each other (10x slowdowns seen).
import torch

torch.set_num_threads(1)
STRICT_SKIPS = os.environ.get("ARCHIPELAGO_STRICT_SKIPS") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if STRICT_SKIPS and rep.skipped and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.longrepr = f"skipped test counts as a failure in CI (ARCHIPELAGO_STRICT_SKIPS=1): {reason}"


_TALLY: dict[str, int] = {}


def pytest_runtest_logreport(report):
    """Sum numeric `record_property` values of passed tests (the robustness suite counts what it tried)."""
    if report.when == "call" and report.passed:
        for name, value in report.user_properties:
            if name.startswith("robustness:") and isinstance(value, int):
                _TALLY[name] = _TALLY.get(name, 0) + value


def pytest_terminal_summary(terminalreporter):
    if _TALLY:
        terminalreporter.section("robustness tally")
        for name, value in sorted(_TALLY.items()):
            terminalreporter.write_line(f"{name[len('robustness: '):]}: {value}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"moto_server did not open port {port} within {timeout}s")


@pytest.fixture(scope="session")
def moto_server():
    """A real S3-compatible server (moto_server) on 127.0.0.1; yields its endpoint URL."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    assert exe, "moto_server not installed: pip install 'moto[server]' (part of the dev extra)"
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:   # a loaded machine: werkzeug can take longer to wind down
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    """Environment pointing s3:// at the moto server, with a fresh bucket; yields the bucket URL."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id-123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-456")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"arch-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    """Run the real `archipelago` CLI as a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "archipelago.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or REPO)


@pytest.fixture
def cli():
    """The real CLI as a subprocess: cli("data", "prepare", ...) -> CompletedProcess."""
    return run_cli


def distinct_free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets held open while choosing, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def free_ports():
    """free_ports(n) -> n distinct free ports on 127.0.0.1 (private ports for a Ray head of a test's own)."""
    return distinct_free_ports
