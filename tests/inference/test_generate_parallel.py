"""`archipelago generate --parallel ...` end to end on *trained* tiny experts (digits, K=2): every launcher
gives the single-device samples for the exact modes, DistriFusion stays close on a model that learned
(stale K/V quality depends on real, smooth-in-t activations, which random weights do not have), so does
PipeFusion, and
expert_parallel over an ensemble.json equals the single-process ensemble."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from archipelago.config import load_config
from archipelago.eval.fidelity import psnr
from archipelago.inference.config import ParallelConfig
from archipelago.inference.launch import sampling_spec
from archipelago.inference.local import launch_local

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RAY_ADDRESS": "", "TORCH_CPP_LOG_LEVEL": "ERROR"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    """Digits in 2 clusters, an expert per cluster (120 steps: clearly past noise) and a router."""
    from archipelago.data.prepare import prepare_data
    from archipelago.ensemble import write_ensemble
    from archipelago.experts.train import train_expert
    from archipelago.router.train import train_router

    root = tmp_path_factory.mktemp("trained")
    cfg = load_config(None, ["data.num_clusters=2", "expert.hidden_size=32", "expert.depth=2",
                             "expert.num_heads=2", "expert.steps=120", "expert.batch_size=32",
                             "expert.lr=0.002", "expert.warmup_steps=10", "expert.checkpoint_every=1000",
                             "expert.ema_decay=0.95", "router.steps=60", "router.hidden_size=16",
                             "router.depth=1", "tracking.enabled=false", "islands.flop_match=none"])
    data = str(root / "data")
    prepare_data(cfg.data, data, progress=False)
    experts = [train_expert(cfg, k, data, str(root / f"expert-{k}"))["final_checkpoint"] for k in (0, 1)]
    router = train_router(cfg, data, str(root / "router"))["router"]
    write_ensemble(str(root / "ensemble.json"), experts, router, data, config_hash=cfg.config_hash())
    return {"expert": str(experts[0]), "ensemble": str(root / "ensemble.json")}


def _generate(cli, tmp_path: Path, name: str, *args: str) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{name}.safetensors"
    proc = cli("generate", "--n", "6", "--steps", "6", "--cfg", "2.0", "--seed", "3", "--out",
               str(tmp_path / f"{name}.png"), "--save-tensor", str(out), *args, env=ENV, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    return load_file(str(out))


@pytest.mark.timeout(420)
def test_torchrun_and_ray_launchers_give_the_single_device_samples(trained, cli, tmp_path):
    ref = _generate(cli, tmp_path, "single", "--expert", trained["expert"])
    stats = tmp_path / "stats.json"
    for launcher in ("torchrun", "ray"):
        got = _generate(cli, tmp_path, launcher, "--expert", trained["expert"], "--parallel", "sync_patch",
                        "--world-size", "2", "--launcher", launcher, "--stats", str(stats))
        assert torch.equal(got["labels"], ref["labels"])
        torch.testing.assert_close(got["samples"], ref["samples"], atol=1e-5, rtol=1e-5, msg=launcher)
        ranks = json.loads(stats.read_text())["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1], launcher
        assert all(r["comm"]["by_type"]["attn_kv"]["bytes"] > 0 for r in ranks), launcher
    cfg_par = _generate(cli, tmp_path, "cfg", "--expert", trained["expert"], "--parallel", "cfg_parallel",
                        "--world-size", "2", "--launcher", "local")
    torch.testing.assert_close(cfg_par["samples"], ref["samples"], atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(300)
def test_expert_parallel_cli_equals_the_single_process_ensemble(trained, cli, tmp_path):
    ref = _generate(cli, tmp_path, "ens", "--ensemble", trained["ensemble"], "--mode", "top-1")
    got = _generate(cli, tmp_path, "ens-ep", "--ensemble", trained["ensemble"], "--mode", "top-1",
                    "--parallel", "expert_parallel", "--world-size", "2", "--launcher", "local")
    torch.testing.assert_close(got["samples"], ref["samples"], atol=1e-5, rtol=1e-5)

    # the console: one progress bar over rank 0's sampler steps and the log file's path, nothing else
    quiet = cli("generate", "--ensemble", trained["ensemble"], "--parallel", "expert_parallel", "--world-size", "2",
                "--launcher", "local", "--n", "2", "--steps", "4", "--out", str(tmp_path / "q.png"), env=ENV,
                timeout=240)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    lines = quiet.stdout.strip().splitlines()
    assert lines[0].startswith("logs: ") and re.match(r"^expert_parallel.* 4/4 ", lines[1]), quiet.stdout
    assert len(lines) == 3 and lines[2].startswith("2 samples (") and not quiet.stderr.strip(), quiet

    bad = cli("generate", "--expert", trained["expert"], "--parallel", "sync_patch", "--world-size", "3",
              "--launcher", "ray", "--n", "2", "--steps", "2", "--out", str(tmp_path / "bad.png"), env=ENV)
    assert bad.returncode == 2 and "must divide the 8 token rows" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad.png").exists()


@pytest.mark.timeout(300)
def test_stale_kv_modes_on_a_trained_expert_are_close_to_single_device(trained):
    """DistriFusion (stale K/V of the other bands) and PipeFusion (stale K/V of the later patches, 2 stages
    x 4 patches) after one synchronous step, against one device and against naive patches."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spec = sampling_spec(trained["expert"], n=8, steps=16, seed=0, device="cpu")
    ref = launch_local(spec, ParallelConfig())[0].samples
    got = {}
    for name, pcfg in (("distrifusion", ParallelConfig(mode="distrifusion", world_size=2, warmup_steps=1)),
                       ("pipefusion", ParallelConfig(mode="pipefusion", world_size=2, warmup_steps=1,
                                                     pipe_patches=4)),
                       ("naive", ParallelConfig(mode="naive_patch", world_size=2))):
        got[name] = psnr(launch_local(spec, pcfg, timeout_s=240)[0].samples, ref)
    print(f"trained expert, 16 steps, world 2: DistriFusion {got['distrifusion']:.1f} dB, "
          f"PipeFusion {got['pipefusion']:.1f} dB, naive patch {got['naive']:.1f} dB")
    assert got["distrifusion"] > 30.0, got
    assert got["distrifusion"] > got["naive"] + 4.0, got
    assert got["pipefusion"] > 30.0, got
    assert got["pipefusion"] > got["naive"] + 4.0, got
