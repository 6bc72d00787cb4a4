"""The new modes through both real launchers: `archipelago generate --parallel` under torchrun (a video expert,
ring and USP over frames x tokens) and Ray actors pinned by `--pin`-style resources (image expert, Ulysses,
ring and PipeFusion), each against the single-device samples."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from archipelago import storage
from archipelago.experts.checkpoint import META
from archipelago.inference.config import ParallelConfig
from archipelago.inference.launch import generate_parallel, sampling_spec
from archipelago.inference.runner import run_parallel_sampling

from .conftest import save_expert, tiny_dit
from .test_sequence_parallel import tiny_video_dit

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RAY_ADDRESS": "", "TORCH_CPP_LOG_LEVEL": "ERROR"}


@pytest.fixture(scope="module")
def video_expert(tmp_path_factory) -> str:
    """A tiny VideoDiT checkpoint whose meta.json records 4-frame clips (as training does)."""
    torch.manual_seed(0)
    url = save_expert(tiny_video_dit(seed=1), str(tmp_path_factory.mktemp("video") / "final"))
    meta = storage.read_json(storage.join(url, META))
    storage.write_json(storage.join(url, META), {**meta, "image_shape": [1, 4, 8, 8]})
    return url


@pytest.mark.timeout(240)
def test_generate_parallel_runs_video_experts_exactly_under_torchrun(video_expert, cli, tmp_path):
    def generate(name: str, *args: str) -> torch.Tensor:
        out = tmp_path / f"{name}.safetensors"
        proc = cli("generate", "--expert", video_expert, "--n", "2", "--steps", "3", "--cfg", "2.0", "--seed", "1",
                   "--out", str(tmp_path / f"{name}.gif"), "--save-tensor", str(out), *args, env=ENV, timeout=200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return load_file(str(out))["samples"]

    ref = generate("single")
    assert ref.shape == (2, 1, 4, 8, 8)
    stats = tmp_path / "stats.json"
    got = generate("ring", "--parallel", "ring", "--world-size", "2", "--launcher", "torchrun", "--stats", str(stats))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    ranks = json.loads(stats.read_text())["ranks"]
    assert all(r["comm"]["by_type"]["attn_ring"]["bytes"] > 0 for r in ranks)

    bad = cli("generate", "--expert", video_expert, "--parallel", "sync_patch", "--world-size", "2", "--n", "2",
              "--out", str(tmp_path / "bad.gif"), env=ENV, timeout=60)
    assert bad.returncode == 2 and "ulysses | ring | usp" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(300)
def test_ray_launcher_with_pinned_ranks_runs_every_new_mode(tmp_path):
    ray = pytest.importorskip("ray")
    torch.manual_seed(0)
    url = save_expert(tiny_dit(seed=6), str(tmp_path / "expert"))
    spec = sampling_spec(url, n=2, steps=3, seed=2, device="cpu")
    ref = run_parallel_sampling(spec, ParallelConfig()).samples
    layouts = {"ulysses": {}, "ring": {}, "pipefusion": {"warmup_steps": 3, "pipe_patches": 2}}
    os.environ.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="ray-")   # short: Ray's socket paths must fit in 107 bytes
    ray.init(num_cpus=2, resources={"pin_a": 1, "pin_b": 1}, include_dashboard=False, log_to_driver=False,
             _temp_dir=temp_dir, runtime_env={"env_vars": {k: v for k, v in ENV.items() if v}})
    try:
        for mode, extra in layouts.items():
            samples, ranks = generate_parallel(spec, ParallelConfig(mode=mode, world_size=2, **extra),
                                               launcher="ray", timeout_s=150, rank_resources=["pin_b", "pin_a"])
            torch.testing.assert_close(samples, ref, atol=1e-5, rtol=1e-5, msg=mode)
            assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["comm"]["total_bytes"] > 0, mode
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
