"""Fault handling on real Ray Train: an island that fails for good leaves the other one alone and a re-run
trains only the missing expert; a worker process killed mid-training is restarted by Ray and the island
resumes from its last checkpoint."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

from archipelago.experts.callbacks import TrainCallback

# The callbacks below travel to Ray workers, which cannot import this test module: pickle them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FailWhileMarked(TrainCallback):
    """Raise at step `at_step` of shard `shard` as long as the file `marker` exists (a broken island)."""

    def __init__(self, shard: int, marker: str, at_step: int = 3):
        self.shard, self.marker, self.at_step = shard, marker, at_step
        self.mine = False

    def on_start(self, info):
        self.mine = info["shard"] == self.shard

    def on_step(self, step, metrics):
        if self.mine and step >= self.at_step and os.path.exists(self.marker):
            raise RuntimeError(f"injected failure on shard {self.shard} at step {step}")


class Rendezvous(TrainCallback):
    """Each island announces its start and waits (up to `timeout` s) until `n` islands have started: the
    islands only all get through quickly if their trainers really run at the same time."""

    def __init__(self, directory: str, n: int = 2, timeout: float = 90.0):
        self.dir, self.n, self.timeout = Path(directory), n, timeout

    def on_start(self, info):
        (self.dir / f"started-{info['shard']}").write_text(str(time.time()))
        deadline = time.time() + self.timeout
        while len(list(self.dir.glob("started-*"))) < self.n and time.time() < deadline:
            time.sleep(0.1)
        met = len(list(self.dir.glob("started-*"))) >= self.n
        (self.dir / f"met-{info['shard']}").write_text("yes" if met else "no")


class WaitToBeKilled(TrainCallback):
    """Record every start (start_step, pid); on the first attempt, after checkpoint `at_step`, publish the
    worker's pid and wait for the test to SIGKILL the process."""

    def __init__(self, state_dir: str, at_step: int = 5):
        self.state_dir, self.at_step = Path(state_dir), at_step

    def on_start(self, info):
        with open(self.state_dir / "starts.jsonl", "a") as fh:
            fh.write(json.dumps({"start_step": info["start_step"], "pid": os.getpid()}) + "\n")

    def on_checkpoint(self, step, url):
        pid_file = self.state_dir / "victim.pid"
        if step == self.at_step and not pid_file.exists():
            pid_file.write_text(str(os.getpid()))
            time.sleep(120)   # killed long before this returns


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_failed_island_is_isolated_and_rerun_trains_only_it(ray_local, run_root, make_config, tmp_path):
    from archipelago.orchestration.pipeline import run_pipeline

    cfg = make_config(run_root)
    marker = tmp_path / "break-shard-1"
    marker.write_text("x")
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    callbacks = [Rendezvous(str(meeting)), FailWhileMarked(shard=1, marker=str(marker))]

    # ---- run 1: island 1 fails for good (its retry fails too), island 0 and the router complete ------------
    first = run_pipeline(cfg, callbacks=callbacks)
    status = {r.name: r.status for r in first.islands}
    assert status == {"island-0": "trained", "island-1": "failed"}, first.table()
    assert not first.ok and [r.name for r in first.failed] == ["island-1"]
    assert "injected failure on shard 1" in first.failed[0].error
    table = first.table().splitlines()
    assert len(table) == 4 and table[2].split()[:3] == ["island-1", "1", "FAILED"]
    assert "injected failure" in table[2]
    assert first.router.status == "trained"
    # Both islands' trainers were up at the same time (two fit() calls from driver threads).
    assert (meeting / "met-0").read_text() == "yes" and (meeting / "met-1").read_text() == "yes"
    assert first.ensemble is None and not (run_root / "ensemble.json").exists()
    summary = json.loads((run_root / "pipeline.json").read_text())
    assert [i["status"] for i in summary["islands"]] == ["trained", "failed"]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_root / 'mlruns.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("orch-test").experiment_id])}
    assert runs["island-1"].info.status == "FAILED" and runs["island-0"].info.status == "FINISHED"
    assert "injected failure" in runs["island-1"].data.tags["archipelago.error"]

    final0 = run_root / "experts" / "expert-0" / "final" / "model.safetensors"
    before = (final0.stat().st_mtime_ns, final0.read_bytes())

    # ---- fix the cause, run again: only island 1 trains ------------------------------------------------
    marker.unlink()
    second = run_pipeline(cfg, callbacks=callbacks)
    assert second.ok, second.table()
    assert {r.name: r.status for r in second.islands} == {"island-0": "skipped", "island-1": "trained"}
    assert second.trainers_started == 1
    assert (final0.stat().st_mtime_ns, final0.read_bytes()) == before     # expert 0 untouched
    assert second.router.status == "skipped"
    assert (run_root / "ensemble.json").exists() and second.grid and second.eval
    assert second.parent_run_id == first.parent_run_id                   # the same pipeline run, finished
    parent = client.get_run(second.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert client.get_run(runs["island-1"].info.run_id).info.status == "FINISHED"
    assert len(client.search_model_versions("name = 'orch-test'")) == 1


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_killed_worker_resumes_from_last_checkpoint(ray_local, run_root, make_config, tmp_path):
    from archipelago.cluster.spec import ClusterSpec
    from archipelago.data.shards import load_manifest
    from archipelago.experts.checkpoint import verify_checkpoint
    from archipelago.orchestration.islands import run_island

    cfg = make_config(run_root, tracking={"enabled": False})
    data_url = str(run_root / "data")
    spec = ClusterSpec.from_config(cfg, load_manifest(data_url), data_url=data_url, root=str(run_root))
    plan = spec.islands[0]
    state = tmp_path / "state"
    state.mkdir()

    def killer() -> None:
        pid_file = state / "victim.pid"
        deadline = time.time() + 200
        while time.time() < deadline and not pid_file.exists():
            time.sleep(0.2)
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)   # the Ray Train worker of island 0

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    res = run_island(plan, cfg, str(run_root), max_failures=1, callbacks=[WaitToBeKilled(str(state))])
    thread.join(timeout=5)

    assert res.status == "trained", res.error
    starts = [json.loads(line) for line in (state / "starts.jsonl").read_text().splitlines()]
    assert [s["start_step"] for s in starts] == [0, 5]              # the restarted group resumed at step 5
    assert starts[0]["pid"] != starts[1]["pid"]                      # ... in a new worker process
    meta = verify_checkpoint(res.final_checkpoint)
    assert meta["step"] == 10
    steps = [json.loads(line)["step"] for line in
             (run_root / "experts" / "expert-0" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10]                                 # each step once, despite the restart
