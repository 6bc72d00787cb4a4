"""Island plans from the config (validation with the field named), the concurrency gate, and a real local
Ray head from `archipelago cluster up|status|down` with an island submitted to it as a Ray job, and the
whole pipeline submitted with `ray job submit ... -- archipelago train` as the README says."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from archipelago.cluster.spec import ClusterSpec, resolve_islands
from archipelago.data.shards import load_manifest
from archipelago.errors import ConfigError
from archipelago.orchestration.islands import ResourceGate

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------
# ClusterSpec / resolve_islands
# ----------------------------------------------------------------------------------------------------

def test_resolve_islands_defaults_and_overrides(prepared_template, make_config, tmp_path):
    cfg = make_config(tmp_path, islands={"num_workers": 1, "cpus_per_worker": 2, "per_island": {
        1: {"num_workers": 2, "gpus_per_worker": 1, "strategy": "ddp", "resources": {"island_h100": 1}}}})
    manifest = load_manifest(str(prepared_template))
    spec = ClusterSpec.from_config(cfg, manifest, data_url=str(prepared_template), root=str(tmp_path))
    a, b = spec.islands
    assert (a.name, a.num_workers, a.strategy, a.backend, a.mode) == ("island-0", 1, "single", "gloo", "ray")
    assert a.resources_per_worker == {"CPU": 2.0}
    assert a.out_url == f"{tmp_path}/experts/expert-0" and a.shard_sha256 == manifest.shards[0].sha256
    assert (b.num_workers, b.strategy, b.backend, b.use_gpu) == (2, "ddp", "nccl", True)
    assert b.resources_per_worker == {"CPU": 2.0, "GPU": 1.0, "island_h100": 1.0}
    assert b.demand == {"CPU": 4.0, "GPU": 2.0, "island_h100": 2.0}
    assert b.island_config(cfg).expert.strategy == "ddp" and cfg.expert.strategy == "single"
    assert spec.router.demand == {"CPU": 2.0} and spec.max_concurrent == 2


@pytest.mark.parametrize("islands, message", [
    ({"per_island": {5: {"num_workers": 1}}}, "islands.per_island.5': there is no shard 5"),
    ({"per_island": {0: {"num_workers": 2}}}, "islands.per_island.0.strategy': 'single' cannot use"),
    ({"num_workers": 3, "per_island": {1: {"strategy": "ddp"}}}, "'islands.strategy'"),
    ({"per_island": {1: {"num_workers": 3, "strategy": "ddp"}}}, "does not split over 3 workers"),
    ({"address": "10.0.0.1:6379", "per_island": {1: {"address": "10.0.0.2:6379"}}}, "job-submission URL"),
    ({"per_island": {0: {"resources": {"GPU": 1}}}}, "resources.GPU"),
])
def test_resolve_islands_rejects_bad_plans(prepared_template, make_config, tmp_path, islands, message):
    cfg = make_config(tmp_path, islands=islands)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve_islands(cfg, load_manifest(str(prepared_template)), data_url=str(prepared_template))


def test_job_address_makes_a_job_island_and_is_redacted(prepared_template, make_config, tmp_path):
    cfg = make_config(tmp_path, islands={"per_island": {1: {"address": "http://user:pw@island-b:8265"}}})
    a, b = resolve_islands(cfg, load_manifest(str(prepared_template)), data_url=str(prepared_template))
    assert a.mode == "ray" and b.mode == "job"
    assert b.params()["address"] == "http://***@island-b:8265"


def test_resource_gate_caps_concurrency_and_fits_demands():
    gate = ResourceGate({"CPU": 2.0}, max_concurrent=3)
    running, peak, lock = [0], [0], threading.Lock()

    def island(demand):
        gate.acquire(demand)
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        gate.release(demand)

    threads = [threading.Thread(target=island, args=({"CPU": 1.0},)) for _ in range(6)]
    [t.start() for t in threads]
    [t.join(5) for t in threads]
    assert peak[0] == 2                                  # 3 allowed, but only 2 x 1 CPU fit in 2 CPUs
    assert gate.too_big({"CPU": 4.0}) == "needs {'CPU': 4.0} but the Ray cluster has {'CPU': 2.0}"
    assert gate.running == 0 and gate.used == {"CPU": 0.0}


def test_reserved_cpu_goes_back_to_the_islands_when_the_router_is_done():
    """2 CPUs, one held for the router: islands run one at a time until the router ends, then two at once."""
    gate = ResourceGate({"CPU": 1.0}, max_concurrent=2)
    gate.acquire({"CPU": 1.0})
    second = threading.Thread(target=gate.acquire, args=({"CPU": 1.0},), daemon=True)
    second.start()
    second.join(0.3)
    assert second.is_alive() and gate.running == 1           # waits: the router's CPU is not free yet
    gate.grow({"CPU": 1.0})                                   # the router ended
    second.join(5)
    assert not second.is_alive() and gate.running == 2 and gate.used == {"CPU": 2.0}


# ----------------------------------------------------------------------------------------------------
# A real local head: cluster up / status / a job island / down
# ----------------------------------------------------------------------------------------------------

def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    # The venv's bin on PATH, as after `source .venv/bin/activate`: the head (and so every job it runs) finds
    # the `archipelago` entry point the way a user's `ray job submit ... -- archipelago train` expects.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "archipelago.cli", *args], check=False, capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


@pytest.mark.e2e
@pytest.mark.timeout(700)
def test_cluster_up_status_job_island_down(run_root, make_config, tmp_path, free_ports):
    from archipelago.cluster.local import read_state
    from archipelago.experts.checkpoint import verify_checkpoint
    from archipelago.orchestration.islands import run_island

    state = tmp_path / "cluster.json"
    # Private ports and session dir: other Ray instances on this machine must neither clash nor attach.
    temp_dir = f"/tmp/arch-{uuid.uuid4().hex[:8]}"
    gcs, dash, client, agent, metrics = free_ports(5)
    up = _cli("cluster", "up", "--num-cpus", "2", "--port", str(gcs), "--dashboard-port", str(dash),
              "--temp-dir", temp_dir, "--state-file", str(state), f"--ray-arg=--ray-client-server-port={client}",
              f"--ray-arg=--dashboard-agent-listen-port={agent}", f"--ray-arg=--metrics-export-port={metrics}")
    head = read_state(state)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "started local Ray head" in up.stdout and f"http://127.0.0.1:{dash}" in up.stdout
        again = _cli("cluster", "up", "--state-file", str(state), "--dashboard-port", str(dash))
        assert again.returncode == 0 and "already running" in again.stdout

        status = _cli("cluster", "status", "--state-file", str(state))
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"127.0.0.1:{gcs}" in status.stdout and "CPU" in status.stdout
        remote = _cli("cluster", "status", "--address", f"http://127.0.0.1:{dash}")
        assert remote.returncode == 0 and "API version" in remote.stdout, remote.stdout + remote.stderr

        # Island 0 on "its own cluster": a Ray job running `archipelago train-expert --shard 0 ...` there.
        cfg = make_config(run_root, islands={"per_island": {0: {"address": f"http://127.0.0.1:{dash}"}}})
        plan = resolve_islands(cfg, load_manifest(str(run_root / "data")), root=str(run_root))[0]
        assert plan.mode == "job"
        res = run_island(plan, cfg, str(run_root), max_failures=0)
        assert res.status == "trained", res.error
        assert verify_checkpoint(res.final_checkpoint)["step"] == 10

        # The whole pipeline as users submit it (README): `ray job submit ... -- archipelago train --config`.
        job_root = tmp_path / "job-run"
        shutil.copytree(run_root / "data", job_root / "data")
        config = tmp_path / "job.yaml"
        config.write_text(yaml.safe_dump(make_config(job_root).model_dump(mode="json"), sort_keys=False))
        ray_exe = str(Path(sys.executable).parent / "ray")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        from archipelago.cluster.local import _local_ray_token

        if _local_ray_token():   # a head started while ~/.ray/auth_token exists requires it (README)
            env["RAY_AUTH_MODE"] = "token"
        job = subprocess.run([ray_exe, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".",
                              "--", "archipelago", "train", "--config", str(config)],
                             check=False, capture_output=True, text=True, env=env, timeout=400, cwd=REPO)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower(), job.stdout[-3000:]
        assert (job_root / "ensemble.json").is_file() and list((job_root / "samples").glob("*.png"))
    finally:
        down = _cli("cluster", "down", "--state-file", str(state))
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert down.returncode == 0 and "stopped local Ray head" in down.stdout, down.stdout + down.stderr
    assert head is not None and not _alive(head.pid) and not state.exists()
    gone = _cli("cluster", "down", "--state-file", str(state))
    assert "nothing stopped" in gone.stdout


def _alive(pid: int, wait: float = 30.0) -> bool:
    """Whether pid still runs after up to `wait` s (a stopped head may take a moment; a zombie is dead)."""
    deadline = time.time() + wait
    while True:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            running = state != "Z"
        except (ProcessLookupError, FileNotFoundError):
            running = False
        if not running or time.time() > deadline:
            return running
        time.sleep(0.5)
