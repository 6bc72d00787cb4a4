"""The two real launchers end to end: torchrun (subprocess) and Ray actors in a placement group."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archipelago.inference.config import ParallelConfig
from archipelago.inference.runner import SamplingSpec, read_samples, run_parallel_sampling

from .conftest import save_expert, tiny_dit

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def expert_url(tmp_path_factory) -> str:
    return save_expert(tiny_dit(seed=4), str(tmp_path_factory.mktemp("expert") / "final"))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.timeout(90)
def test_torchrun_launcher_writes_the_single_device_output(expert_url, tmp_path):
    spec = SamplingSpec(experts=[expert_url], num_samples=2, steps=4, seed=5, device="cpu")
    ref = run_parallel_sampling(spec, ParallelConfig()).samples
    out, stats = tmp_path / "x.safetensors", tmp_path / "stats.json"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "archipelago.inference",
           "--expert", expert_url, "--mode", "sync_patch", "--num-samples", "2", "--steps", "4",
           "--seed", "5", "--device", "cpu", "--out", str(out), "--stats", str(stats)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(), timeout=80,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(read_samples(str(out)), ref, atol=1e-5, rtol=1e-5)
    summary = json.loads(stats.read_text())
    assert summary["world_size"] == 2 and summary["comm"]["by_type"]["attn_kv"]["bytes"] > 0

    bad = subprocess.run([*cmd[:3], "1", *cmd[4:8], "--mode", "sync_patch", "--patch-degree", "3"],
                         check=False, capture_output=True, text=True, env=_env(), timeout=60, cwd=tmp_path)
    assert bad.returncode != 0 and "patch_degree=3 x cfg_degree=1 x expert_degree=1" in bad.stderr


@pytest.mark.timeout(180)
def test_ray_launcher_sync_patch_equals_single_device(expert_url, tmp_path):
    ray = pytest.importorskip("ray")
    from archipelago.inference.ray_launcher import launch_ray, placement_strategy

    assert [placement_strategy(n, 4) for n in (1, 2, 4)] == ["PACK", "SPREAD", "STRICT_SPREAD"]
    spec = SamplingSpec(experts=[expert_url], num_samples=2, steps=4, seed=6, device="cpu",
                        out=str(tmp_path / "grid.png"))
    ref = run_parallel_sampling(spec.model_copy(update={"out": None}), ParallelConfig()).samples
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}})
    try:
        results = launch_ray(spec, ParallelConfig(mode="sync_patch", world_size=2), timeout_s=150)
    finally:
        ray.shutdown()
    assert [r.rank for r in results] == [0, 1]
    for r in results:
        torch.testing.assert_close(r.samples, ref, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
