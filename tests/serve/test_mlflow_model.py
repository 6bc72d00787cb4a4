"""The registered ensemble is a real MLflow pyfunc model: registered on a real sqlite store from a tiny trained
ensemble, loaded with `mlflow.pyfunc.load_model("models:/NAME/V")` it returns the samples `archipelago
generate` writes for the same arguments, and `mlflow models serve` answers real HTTP requests."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from archipelago.config import ArchipelagoConfig

NAME = "serve-test"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_ensemble):
    """(tracking URI, ensemble URL, root) after registering the tiny ensemble through the pipeline's Tracker."""
    from archipelago.orchestration.tracking import Tracker

    root = tmp_path_factory.mktemp("mlflow-model")
    ens, data = tiny_ensemble
    cfg = ArchipelagoConfig()
    cfg.name = NAME
    tracker = Tracker.open(cfg, str(root))
    version = tracker.register_ensemble(NAME, ens, {"manifest": str(data / "manifest.json")},
                                        {"archipelago.k": 2})
    assert version == "1"
    return tracker.uri, ens, root


def _load(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.pyfunc.load_model(f"models:/{NAME}/1")


def test_registered_version_is_a_pyfunc_model_without_pickles(registered):
    import mlflow

    uri, _, root = registered
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(root / "dl")))
    assert (local / "MLmodel").is_file() and (local / "manifest.json").is_file()
    assert "python_function" in (local / "MLmodel").read_text()
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin"))], files
    weights = sorted(f for f in files if f.endswith(".safetensors"))
    assert weights == ["artifacts/ensemble/experts/expert-0/ema.safetensors",
                       "artifacts/ensemble/experts/expert-1/ema.safetensors",
                       "artifacts/ensemble/router/router.safetensors"], weights
    spec = json.loads((local / "artifacts" / "ensemble" / "ensemble.json").read_text())
    assert spec["experts"] == {"0": "experts/expert-0", "1": "experts/expert-1"} and spec["data_url"] is None


@pytest.mark.parametrize("routing", ["top-2", "full"])
def test_predict_returns_the_samples_of_archipelago_generate(registered, tmp_path, routing):
    import pandas as pd
    from typer.testing import CliRunner

    from archipelago.cli import app
    from archipelago.generate import load_samples

    uri, ens, _ = registered
    out = CliRunner().invoke(app, ["generate", "--ensemble", ens, "--mode", routing, "--n", "3", "--cfg", "1.5",
                                   "--seed", "7", "--steps", "3", "--out", str(tmp_path / "g.png"),
                                   "--save-tensor", str(tmp_path / "s.safetensors")])
    assert out.exit_code == 0, out.output
    x, labels = load_samples(str(tmp_path / "s.safetensors"))

    model = _load(uri)
    req = pd.DataFrame([{"n": 3, "cfg": 1.5, "seed": 7, "steps": 3, "routing": routing}])
    pred = model.predict(req)
    assert pred["samples"].dtype == np.float32 and pred["samples"].shape == tuple(x.shape)
    assert torch.equal(torch.from_numpy(pred["samples"]), x)
    assert pred["labels"].tolist() == labels.tolist() == [0, 1, 2]
    # Two rows: each is its own request (own seed), in row order.
    two = model.predict(pd.DataFrame([{"n": 2, "seed": 1, "steps": 2, "classes": [9, 4]},
                                      {"n": 1, "seed": 2, "steps": 2, "classes": []}]))
    assert two["request"].tolist() == [0, 0, 1] and two["labels"].tolist() == [9, 4, 0]
    assert not np.array_equal(two["samples"][0], two["samples"][2])


def test_bad_requests_are_one_line_errors(registered):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    model = _load(registered[0])
    cases = {"routing": ({"n": 1, "routing": "top-5"}, "top-5"),
             "class": ({"n": 1, "classes": [10]}, "classes must be 1 labels in [0, 10)"),
             "n": ({"n": 100000}, "n=100000 must be in [1, 256]"),
             "sampler": ({"n": 1, "sampler": "rk4"}, "euler | heun")}
    for what, (row, text) in cases.items():
        with pytest.raises(MlflowException) as err:
            model.predict(pd.DataFrame([row]))
        assert text in str(err.value) and "\n" not in str(err.value).strip(), what


def test_the_same_ensemble_is_registered_once(registered):
    from archipelago.ensemble import read_spec, write_ensemble
    from archipelago.orchestration.tracking import Tracker

    _, ens, root = registered
    cfg = ArchipelagoConfig()
    cfg.name = NAME
    tracker = Tracker.open(cfg, str(root))
    assert tracker.reused
    assert tracker.register_ensemble(NAME, ens, {}, {}) == "1"          # same bytes: same version
    spec = read_spec(ens)
    other = str(root / "renamed" / "ensemble.json")                     # same members, other bytes
    write_ensemble(other, spec.experts, spec.router, spec.data_url, spec.config_hash, name="renamed")
    assert tracker.register_ensemble(NAME, other, {}, {}) == "2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.e2e
def test_mlflow_models_serve_answers_invocations(registered, tmp_path):
    uri, _, _ = registered
    port = _free_port()
    # `mlflow models serve` execs `uvicorn` by name: the interpreter's bin directory must be on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    with open(tmp_path / "serve.log", "wb") as log:
        _serve_and_query(uri, port, env, log, tmp_path)


def _serve_and_query(uri: str, port: int, env: dict, log, tmp_path: Path) -> None:
    """Start `mlflow models serve` on 127.0.0.1:port, query it, and stop it (by its process group)."""
    import pandas as pd

    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/1",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 75
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping within 75 s:\n" + \
                (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)

        row = {"n": 2, "seed": 5, "steps": 2, "cfg": 1.0, "routing": "top-1", "classes": [3, 8]}
        status, body = _post(f"{base}/invocations", json.dumps({"dataframe_records": [row]}).encode())
        assert status == 200, body
        got = np.asarray(body["predictions"]["samples"], dtype=np.float32)
        expected = _load(uri).predict(pd.DataFrame([row]))
        assert got.shape == expected["samples"].shape == (2, 1, 16, 16)
        np.testing.assert_allclose(got, expected["samples"], rtol=0, atol=1e-6)
        assert body["predictions"]["labels"] == [3, 8]
        # A bad request is a 4xx with one message, and the server keeps serving.
        status, body = _post(f"{base}/invocations",
                             json.dumps({"dataframe_records": [{"n": 1, "routing": "top-9"}]}).encode())
        assert 400 <= status < 500 and "top-9" in body.get("message", ""), body
        status, _ = _post(f"{base}/invocations", json.dumps({"dataframe_records": [row]}).encode())
        assert status == 200
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the process group this test started (the server and its uvicorn worker)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
