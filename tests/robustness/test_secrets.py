"""No credential leaks: the real `archipelago train` pipeline (K=2 islands on local Ray Train + the router,
ensemble, samples, eval, MLflow) runs with storage.root on s3:// (a real moto server) while S3 credentials
and an MLflow token sit in its environment; then every log line (stdout/stderr, Ray workers included),
every MLflow param / tag / metric name / model-version tag, every local file written (the MLflow store and
artifacts, Ray's session logs, anything in the working directory) and every S3 object is searched for them.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml
from robustness_support import subprocess_env, tiny_raw

pytestmark = pytest.mark.e2e

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIALEAKCHECK7Q2W9E",
    "AWS_SECRET_ACCESS_KEY": "leak-check-secret-4f9Xk2LmQ8vZ",
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-leak-check-7Hq3Rt",
}


def _found(blob: bytes | str) -> list[str]:
    data = blob.encode() if isinstance(blob, str) else blob
    return [name for name, value in SECRETS.items() if value.encode() in data]


@pytest.fixture
def ray_tmp():
    """A short directory for Ray's session (its unix socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="arch-ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(600)
def test_pipeline_on_s3_never_writes_or_prints_credentials(moto_server, tmp_path, ray_tmp, record_property):
    import boto3

    bucket = f"arch-secrets-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                      aws_access_key_id=SECRETS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=SECRETS["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=bucket)
    work = tmp_path / "work"
    work.mkdir()
    config = work / "pipeline.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(
        name="secrets-check",
        islands={"num_workers": 1, "cpus_per_worker": 0.5, "max_failures": 1, "max_concurrent": 2},
        tracking={"enabled": True, "experiment": "secrets-check",
                  "tracking_uri": f"sqlite:///{work / 'mlruns.db'}"},
        storage={"root": f"s3://{bucket}/run"})))
    env = subprocess_env({**SECRETS, "AWS_ENDPOINT_URL": moto_server, "AWS_DEFAULT_REGION": "us-east-1",
                          "RAY_ADDRESS": "local", "RAY_TMPDIR": str(ray_tmp)})
    res = subprocess.run([sys.executable, "-m", "archipelago.cli", "train", "--config", str(config)],
                         check=False, capture_output=True, text=True, env=env, timeout=540, cwd=work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"s3://{bucket}/run/ensemble.json" in res.stdout

    # ---- logs: the CLI's own lines and everything Ray forwards from the islands and the router ----------
    assert not _found(res.stdout + res.stderr), _found(res.stdout + res.stderr)

    # ---- every S3 object the pipeline wrote --------------------------------------------------------------
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert "run/ensemble.json" in keys and "run/data/manifest.json" in keys
    assert any(k.startswith("run/experts/expert-1/final/") for k in keys)
    leaks = {k: _found(s3.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys}
    assert not {k: v for k, v in leaks.items() if v}, leaks

    # ---- every local file: the MLflow store + artifacts, Ray's session logs, the working directory --------
    files = [p for root in (tmp_path, ray_tmp) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "mlruns.db" for p in files) and any(p.suffix in (".log", ".out", ".err") for p in files)
    leaks = {str(p): _found(p.read_bytes()) for p in files}
    assert not {k: v for k, v in leaks.items() if v}, leaks

    # ---- MLflow, through its API: params, tags, metric names of every run; model versions --------------
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    exp = client.get_experiment_by_name("secrets-check")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 4   # the pipeline + island-0 + island-1 + router
    for run in runs:
        texts = [*run.data.params.items(), *run.data.tags.items(), *run.data.metrics]
        assert not _found(repr(texts)), (run.info.run_name, _found(repr(texts)))
    assert any("storage.root" in run.data.params for run in runs)     # the params really were logged
    for mv in client.search_model_versions("name = 'secrets-check'"):
        assert not _found(repr([mv.source, mv.description, mv.tags])), mv.version
    # log streams + S3 objects + local files + MLflow runs, every one grepped for each credential
    record_property("robustness: places grepped for secrets", 1 + len(keys) + len(files) + len(runs))
