"""`generate` and the `archipelago generate` / `archipelago eval` commands, on real (tiny, briefly trained)
experts, router and ensemble.json; the CLI runs as a real subprocess."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from archipelago.config import ArchipelagoConfig
from archipelago.generate import generate, load_sampler_model, load_samples, sample_grid

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (one torch thread: CI has 2 cores shared with the test runner)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "archipelago.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env, check=False)


def _grid_side(n: int, tile: int, scale: int = 4, pad: int = 1) -> tuple[int, int]:
    """(width, height) of imaging.save_grid's PNG for n tiles of tile x tile pixels."""
    nrow = math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    return (nrow * (tile + pad) + pad) * scale, (rows * (tile + pad) + pad) * scale


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from archipelago.data.prepare import prepare_data
    from archipelago.ensemble import write_ensemble
    from archipelago.experts.train import train_expert
    from archipelago.router.train import train_router

    root = tmp_path_factory.mktemp("gen")
    cfg = ArchipelagoConfig()
    cfg.data.num_clusters = 2
    for key, val in {"hidden_size": 32, "depth": 1, "num_heads": 2, "steps": 5, "batch_size": 32,
                     "warmup_steps": 1, "checkpoint_every": 100, "log_every": 5}.items():
        setattr(cfg.expert, key, val)
    cfg.router.steps, cfg.router.batch_size, cfg.router.hidden_size, cfg.router.depth = 10, 32, 16, 1
    cfg.expert.sample_steps = 4
    cfg.inference.num_samples = 6
    data = str(root / "data")
    prepare_data(cfg.data, data, progress=False)
    experts = {k: train_expert(cfg, k, data, str(root / f"expert-{k}"))["final_checkpoint"] for k in range(2)}
    router = train_router(cfg, data, str(root / "router"))["router"]
    ens = str(root / "ensemble.json")
    write_ensemble(ens, experts, router, data, cfg.config_hash())
    return {"root": root, "cfg": cfg, "data": data, "experts": experts, "ensemble": ens}


@pytest.mark.parametrize("kind", ["ensemble", "expert"])
def test_cli_generate_writes_a_png_and_tensor(run, tmp_path, kind):
    src = run["ensemble"] if kind == "ensemble" else run["experts"][1]
    png, tensor = tmp_path / "grid.png", tmp_path / "s.safetensors"
    args = ["generate", f"--{kind}", src, "--n", "5", "--cfg", "2.0", "--seed", "3", "--steps", "3",
            "--out", str(png), "--save-tensor", str(tensor)]
    if kind == "ensemble":
        args += ["--mode", "top-2"]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    assert str(png) in r.stdout
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.size == _grid_side(5, 16)
    x, labels = load_samples(str(tensor))
    assert x.shape == (5, 1, 16, 16) and labels.tolist() == [0, 1, 2, 3, 4]
    # The CLI's samples are the library's samples for the same seed.
    model = load_sampler_model(src, mode="top-2")
    assert torch.allclose(x, generate(model, 5, cfg_scale=2.0, seed=3, steps=3), atol=1e-5)
    if kind == "ensemble":
        assert model.expert_calls > 0 and "expert calls" in r.stdout


def test_cli_generate_errors_are_one_line(run, tmp_path):
    r = _cli("generate", "--expert", str(tmp_path / "nope"), "--out", str(tmp_path / "g.png"))
    assert r.returncode == 2 and "neither an ensemble.json nor an expert checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("generate", "--ensemble", run["ensemble"], "--mode", "top-5", "--out", str(tmp_path / "g.png"))
    assert r.returncode == 2 and "top-5 needs at least 5 experts" in r.stderr.replace("\n", " ")


def test_generate_is_seeded_and_forces_eval_mode(run):
    model = load_sampler_model(run["experts"][0])
    a = generate(model, 4, cfg_scale=2.0, seed=0, steps=3)
    model.train()             # label dropout would randomly drop classes if generate did not switch it off
    model.y_embedder.dropout_prob = 1.0
    b = generate(model, 4, cfg_scale=2.0, seed=0, steps=3)
    assert not model.training and torch.equal(a, b)
    assert not torch.equal(a, generate(model, 4, cfg_scale=2.0, seed=1, steps=3))
    c = generate(model, 4, cfg_scale=2.0, seed=0, steps=3, classes=torch.tensor([9, 9, 9, 9]))
    assert not torch.equal(a, c)


def test_sample_grid_for_the_quickstart(run, tmp_path):
    out = sample_grid(run["ensemble"], str(tmp_path / "q.png"), run["cfg"])
    assert out["n"] == 6
    with Image.open(tmp_path / "q.png") as im:
        assert im.size == _grid_side(6, 16)


def test_cli_eval_scores_samples(run, tmp_path):
    tensor = tmp_path / "s.safetensors"
    r = _cli("generate", "--ensemble", run["ensemble"], "--mode", "full", "--n", "20", "--steps", "2",
             "--out", str(tmp_path / "g.png"), "--save-tensor", str(tensor))
    assert r.returncode == 0, r.stderr
    cache = tmp_path / "clf.safetensors"
    r = _cli("eval", "--samples", str(tensor), "--reference", run["data"], "--shard", "1",
             "--classifier-cache", str(cache))
    assert r.returncode == 0, r.stderr
    assert "feature_distance" in r.stdout and "FID/KID skipped" in r.stdout
    res = json.loads((tmp_path / "s.eval.json").read_text())
    assert res["n_samples"] == 20 and res["shard"] == 1 and res["feature_distance"] > 0
    assert 0.0 <= res["class_consistency"] <= 1.0 and res["classifier_test_accuracy"] > 0.9
    assert cache.is_file()


def test_cli_generate_sample_once_one_device_and_expert_parallel(run, tmp_path):
    """sample-once through the CLI: ensemble.json carries the shards' class counts, so the CLI needs no data;
    one device and expert_parallel (2 local ranks) draw the same experts and produce the same samples."""
    from archipelago.data.shards import load_manifest
    from archipelago.ensemble import read_spec

    assert read_spec(run["ensemble"]).shard_class_counts == load_manifest(run["data"]).class_counts
    one, par = tmp_path / "one.safetensors", tmp_path / "par.safetensors"
    common = ["generate", "--ensemble", run["ensemble"], "--mode", "sample-once", "--n", "6", "--cfg", "2.0",
              "--steps", "3", "--seed", "5"]
    r = _cli(*common, "--out", str(tmp_path / "one.png"), "--save-tensor", str(one))
    assert r.returncode == 0, r.stderr
    r = _cli(*common, "--out", str(tmp_path / "par.png"), "--save-tensor", str(par), "--parallel",
             "expert_parallel", "--world-size", "2", "--launcher", "local")
    assert r.returncode == 0, r.stderr
    (x1, _), (x2, _) = load_samples(str(one)), load_samples(str(par))
    assert torch.allclose(x1, x2, atol=1e-5)
    model = load_sampler_model(run["ensemble"], mode="sample-once")
    assert torch.allclose(x1, generate(model, 6, cfg_scale=2.0, seed=5, steps=3), atol=1e-5)
    assert model.router_calls == 0 and sum(model.expert_samples) == 2 * 6 * 3   # one expert per sample


def test_cli_generate_takes_its_settings_from_the_config_tree_and_flags_override(run, tmp_path):
    """`inference:` (and expert.cfg_scale / sample_steps) is the one source; each flag overrides its field."""
    config = tmp_path / "gen.yaml"
    config.write_text("expert:\n  cfg_scale: 1.5\n  sample_steps: 3\n"
                      "inference:\n  mode: expert_parallel\n  world_size: 2\n  launcher: local\n"
                      "  routing: top-1\n  num_samples: 3\n  seed: 7\n")
    model = load_sampler_model(run["ensemble"], mode="top-1")
    par = tmp_path / "par.safetensors"
    r = _cli("generate", "--ensemble", run["ensemble"], "--config", str(config), "--out", str(tmp_path / "p.png"),
             "--save-tensor", str(par))
    assert r.returncode == 0, r.stderr
    assert "expert_parallel world=2" in r.stdout and ", local)" in r.stdout, r.stdout
    x, _ = load_samples(str(par))
    assert torch.allclose(x, generate(model, 3, cfg_scale=1.5, seed=7, steps=3), atol=1e-5)

    one = tmp_path / "one.safetensors"
    r = _cli("generate", "--ensemble", run["ensemble"], "--config", str(config), "--set", "inference.mode=single",
             "--n", "2", "--seed", "8", "--cfg", "1.0", "--out", str(tmp_path / "o.png"), "--save-tensor", str(one))
    assert r.returncode == 0, r.stderr
    x, _ = load_samples(str(one))
    assert torch.allclose(x, generate(model, 2, cfg_scale=1.0, seed=8, steps=3), atol=1e-5)

    bad = _cli("generate", "--ensemble", run["ensemble"], "--config", str(config), "--launcher", "mpi",
               "--out", str(tmp_path / "b.png"))
    assert bad.returncode == 2 and "field 'inference.launcher'" in bad.stderr and "mpi" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "b.png").exists()


def test_flag_overrides_name_the_config_fields():
    from archipelago.config import load_config
    from archipelago.inference.config import ParallelConfig
    from archipelago.sampling_job import flag_overrides

    assert flag_overrides(n=None, parallel="distrifusion", world_size=4, steps=8) == [
        "inference.mode=distrifusion", "inference.world_size=4", "expert.sample_steps=8"]
    cfg = load_config(None, flag_overrides(parallel="distrifusion", world_size=4, warmup_steps=3))
    pcfg = ParallelConfig.from_inference(cfg.inference)
    assert (pcfg.mode.value, pcfg.world_size, pcfg.patch_degree, pcfg.warmup_steps) == ("distrifusion", 4, 4, 3)
    with pytest.raises(ValueError, match="no config field"):
        flag_overrides(colour="red")
