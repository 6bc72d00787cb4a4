"""MLflow tracking against a real sqlite store: run reuse across re-runs of one config, secret-free params, the rank-0 metrics callback, and retries when sqlite is locked."""
from __future__ import annotations

import pickle
import threading

import pytest

from archipelago.orchestration.tracking import (
    MlflowMetricsCallback,
    Tracker,
    flatten,
    is_locked_error,
    scrub,
    with_retry,
)


def test_flatten_scrubs_credentials(monkeypatch, make_config, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-991")
    cfg = make_config(tmp_path, tracking={"tracking_uri": "https://alice:hunter2@mlflow.example:5000"})
    params = flatten(cfg.model_dump(mode="json"))
    assert params["tracking.tracking_uri"] == "https://***@mlflow.example:5000"
    assert params["expert.steps"] == "10" and params["islands.per_island"] == "{}"
    assert scrub("key=s3cr3t-value-991") == "key=<AWS_SECRET_ACCESS_KEY>"
    assert not any("hunter2" in v or "s3cr3t" in v for v in params.values())


def test_with_retry_retries_only_locked_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert with_retry(flaky) == "ok" and len(calls) == 3
    assert is_locked_error(RuntimeError("database table is locked"))
    with pytest.raises(ValueError):
        with_retry(lambda: (_ for _ in ()).throw(ValueError("other")))


def test_tracker_reuses_runs_of_the_same_config_and_registers_once(make_config, tmp_path):
    from mlflow import MlflowClient

    cfg = make_config(tmp_path)
    first = Tracker.open(cfg, str(tmp_path))
    island = first.child("island-0", "island-0", {"island": {"shard": 0}}, {"archipelago.shard": 0})
    assert first.uri == f"sqlite:///{tmp_path / 'mlruns.db'}" and not first.reused
    again = Tracker.open(cfg, str(tmp_path))
    assert again.reused and again.parent_run_id == first.parent_run_id
    assert again.child("island-0", "island-0", {"island": {"shard": 0}}, {}) == island

    # register_ensemble (one version per ensemble.json, a pyfunc model) is tested on a real ensemble in
    # tests/serve/test_mlflow_model.py.

    other = Tracker.open(make_config(tmp_path, expert={"steps": 11}), str(tmp_path))
    assert not other.reused and other.parent_run_id != first.parent_run_id
    client = MlflowClient(first.uri)
    child = client.get_run(island)
    assert child.data.tags["mlflow.parentRunId"] == first.parent_run_id
    assert client.get_run(first.parent_run_id).data.params["config_hash"] == cfg.config_hash()


def test_metrics_callback_logs_from_rank_0_only_and_pickles_without_client(make_config, tmp_path):
    from mlflow import MlflowClient

    tracker = Tracker.open(make_config(tmp_path), str(tmp_path))
    runs = [tracker.child(f"island-{i}", f"island-{i}", {}, {}) for i in range(2)]
    for rank, run_id in enumerate(runs):
        cb = MlflowMetricsCallback(tracker.uri, run_id, flush_every_s=3600)
        cb.on_start({"rank": rank, "start_step": 0})
        for step in (2, 4, 6):
            cb.on_step(step, {"loss": 1.0 / step, "lr": 0.1})
        clone = pickle.loads(pickle.dumps(cb))
        assert clone._client is None and clone._rows == []
        cb.on_end({})
    client = MlflowClient(tracker.uri)
    assert [m.step for m in client.get_metric_history(runs[0], "loss")] == [2, 4, 6]
    assert client.get_metric_history(runs[1], "loss") == []


def test_concurrent_writers_on_sqlite_all_land(make_config, tmp_path):
    from mlflow import MlflowClient

    tracker = Tracker.open(make_config(tmp_path), str(tmp_path))
    runs = [tracker.child(f"island-{i}", f"island-{i}", {}, {}) for i in range(4)]

    def writer(run_id):
        cb = MlflowMetricsCallback(tracker.uri, run_id, flush_every_s=0.0)   # one write per step
        cb.on_start({"rank": 0, "start_step": 0})
        for step in range(1, 21):
            cb.on_step(step, {"loss": float(step)})
        cb.on_end({})

    threads = [threading.Thread(target=writer, args=(r,)) for r in runs]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    client = MlflowClient(tracker.uri)
    assert all(len(client.get_metric_history(r, "loss")) == 20 for r in runs)
