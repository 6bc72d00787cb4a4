"""The whole pipeline through the real CLI: 2 islands on real Ray Train (gloo) next to the router, then
ensemble.json, a PNG grid, eval.json, and an MLflow sqlite store with the parent / island / router runs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FAKE_SECRET = "fake-secret-Zq9wX7vB2nK4"
FAKE_KEY_ID = "AKIAFAKEKEYID0042"


# What Ray Train's workers and controllers print for every island (the console noise of issue 17).
RAY_TRAIN_LINES = ("Reporting training result", "Checkpoint successfully created", "(RayTrainWorker pid=")


def table_rows(stdout: str) -> list[str]:
    """The summary table's island / router lines (not the progress lines printed as islands finish)."""
    return [ln for ln in stdout.splitlines() if re.match(r"^(island-\d+\s+\d+|router\s+-)\s", ln)]


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_train_two_islands_end_to_end(run_root, make_config, tmp_path):
    cfg = make_config(run_root)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
           # A run id exported by some outer tool must not capture our runs.
           "MLFLOW_RUN_ID": "0123456789abcdef0123456789abcdef"}
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run([sys.executable, "-m", "archipelago.cli", "train", "--config", str(config_file)],
                         check=False, capture_output=True, text=True, env=env, timeout=360, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    # ---- one live table (island, shard, step/steps, loss, samples/s, ETA, status); Ray's logs in a file ---
    table = table_rows(res.stdout)
    assert [ln.split()[0] for ln in table] == ["island-0", "island-1", "router"], res.stdout
    assert all(ln.split()[2] == "10/10" and ln.split()[-1] == "trained" for ln in table), res.stdout
    assert re.search(r"^island\s+shard\s+step/steps\s+loss\s+samples/s\s+ETA\s+status", res.stdout, re.MULTILINE), res.stdout
    for noise in RAY_TRAIN_LINES:
        assert noise not in res.stdout + res.stderr, (noise, res.stdout + res.stderr)
    logs = re.search(r"^logs: (\S+) \(--verbose shows them here\)$", res.stdout, re.MULTILINE)
    assert logs, res.stdout
    log_text = Path(logs.group(1)).read_text()
    assert any(noise in log_text for noise in RAY_TRAIN_LINES), log_text[-2000:]

    # ---- outputs: experts, router, ensemble.json that loads, a PNG grid, eval.json --------------------
    from archipelago.ensemble import load_ensemble
    from archipelago.experts.checkpoint import verify_checkpoint

    for k in (0, 1):
        meta = verify_checkpoint(str(run_root / "experts" / f"expert-{k}" / "final"))
        assert meta["step"] == 10 and meta["shard"] == k
    ensemble = load_ensemble(str(run_root / "ensemble.json"))
    assert len(ensemble.experts) == 2
    pngs = sorted((run_root / "samples").glob("*.png"))
    assert pngs and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = json.loads((run_root / "eval.json").read_text())
    assert ev["n_samples"] == 16 and ev["feature_distance"] > 0
    summary = json.loads((run_root / "pipeline.json").read_text())
    assert summary["ok"] and [i["status"] for i in summary["islands"]] == ["trained", "trained"]
    assert (run_root / "ray" / "island-0").is_dir() and (run_root / "ray" / "island-1").is_dir()

    # ---- MLflow: parent run, 2 island children + router child, per-step metrics, shard tags ------------
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_root / 'mlruns.db'}")
    exp = client.get_experiment_by_name("orch-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["expert.steps"] == "10" and parent.data.params["data.num_clusters"] == "2"
    assert "eval.feature_distance" in parent.data.metrics
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"island-0", "island-1", "router"}
    manifest = json.loads((run_root / "data" / "manifest.json").read_text())
    for k in (0, 1):
        run = children[f"island-{k}"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["archipelago.shard"] == str(k)
        assert run.data.tags["archipelago.shard_sha256"] == manifest["shards"][k]["sha256"]
        assert run.data.tags["archipelago.checkpoint_uri"].endswith(f"expert-{k}/final")
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == [2, 4, 6, 8, 10]          # log_every=2, from rank 0 only
        assert run.data.params["island.num_workers"] == "1" and run.data.params["island.backend"] == "gloo"
    router_history = client.get_metric_history(children["router"].info.run_id, "loss")
    assert len(router_history) >= 2
    # Artifacts: the grid, eval.json; the ensemble is registered as an MLflow model with its manifest.
    paths = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert any(p.endswith(".png") for p in paths) and "results/eval.json" in paths
    versions = client.search_model_versions("name = 'orch-test'")
    assert len(versions) == 1 and versions[0].run_id == parent.info.run_id
    ens_files = {a.path for a in client.list_artifacts(parent.info.run_id, "ensemble")}
    assert {"ensemble/MLmodel", "ensemble/manifest.json", "ensemble/artifacts"} <= ens_files   # a pyfunc model

    # ---- no secret anywhere: params, tags (runs and model versions) -----------------------------------
    for run in runs:
        values = list(run.data.params.values()) + list(run.data.tags.values())
        assert not any(FAKE_SECRET in v or FAKE_KEY_ID in v for v in values), run.info.run_name
    for mv in versions:
        assert not any(FAKE_SECRET in v for v in (mv.tags or {}).values())
    assert FAKE_SECRET not in res.stdout + res.stderr

    # ---- --verbose: the logs come back to the console (two more steps, so the islands train again) ---------
    more = subprocess.run([sys.executable, "-m", "archipelago.cli", "train", "--config", str(config_file), "--verbose",
                           "--set", "expert.steps=12"],
                          check=False, capture_output=True, text=True, env=env, timeout=360, cwd=REPO)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert "--verbose shows them here" not in more.stdout
    assert any(noise in more.stdout + more.stderr for noise in RAY_TRAIN_LINES), more.stdout + more.stderr
    assert FAKE_SECRET not in more.stdout + more.stderr
