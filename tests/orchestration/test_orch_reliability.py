"""Reliability of islands on real Ray Train: a diverging island fails alone, once (Ray does not retry a
deterministic divergence), as FAILED in the summary and in MLflow, with no final checkpoint."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cloudpickle
import pytest

from archipelago.experts.callbacks import TrainCallback

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class PoisonWeights(TrainCallback):
    """At report step `at_step` of shard `shard`, set one weight to nan (a diverged model); count starts."""

    def __init__(self, shard: int, state_dir: str, at_step: int = 4):
        self.shard, self.state_dir, self.at_step = shard, Path(state_dir), at_step
        self.model = None

    def on_start(self, info):
        if info["shard"] == self.shard and info["rank"] == 0:
            self.model = info["model"]
            with open(self.state_dir / "starts", "a") as fh:
                fh.write(f"{info['start_step']}\n")

    def on_step(self, step, metrics):
        if self.model is not None and step == self.at_step:
            import torch

            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_diverging_island_fails_once_and_alone(ray_local, run_root, make_config, tmp_path, record_property):
    from mlflow import MlflowClient

    from archipelago.orchestration.pipeline import run_pipeline

    cfg = make_config(run_root)
    res = run_pipeline(cfg, callbacks=[PoisonWeights(shard=1, state_dir=str(tmp_path))])
    status = {r.name: r.status for r in res.islands}
    assert status == {"island-0": "trained", "island-1": "failed"}, res.table()
    err = res.failed[0].error
    assert "expert 1" in err and "non-finite loss nan at step 5" in err and "no final checkpoint" in err, err
    assert "last good checkpoint:" in err and "step-00000001" in err, err
    row = res.table().splitlines()[2]
    assert row.split()[:3] == ["island-1", "1", "FAILED"] and "non-finite" in row
    # Not retried *because of* the divergence; on a loaded machine Ray may still restart a worker whose health
    # check timed out (max_failures=1), which then diverges again from its step-1 checkpoint.
    starts = (tmp_path / "starts").read_text().split()
    assert starts[0] == "0" and len(starts) <= 1 + cfg.islands.max_failures, starts
    assert not (run_root / "experts" / "expert-1" / "final").exists()
    assert res.ensemble is None and not (run_root / "ensemble.json").exists()
    summary = json.loads((run_root / "pipeline.json").read_text())
    assert "non-finite" in summary["islands"][1]["error"]
    client = MlflowClient(f"sqlite:///{run_root / 'mlruns.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("orch-test").experiment_id])}
    assert runs["island-1"].info.status == "FAILED" and runs["island-0"].info.status == "FINISHED"
    assert "non-finite" in runs["island-1"].data.tags["archipelago.error"]
    record_property("robustness: diverged islands failed alone", 1)
