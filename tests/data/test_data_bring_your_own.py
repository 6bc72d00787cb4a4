"""The README's "Bring your own data" path through the real CLI: configs/imagefolder-latents.yaml pointed at an
image folder on S3 (moto_server), a local VAE and a local CLIP (tiny, random), `data prepare` -> one expert
trained from streamed chunks on S3 -> a decoded PNG grid."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from archipelago.data import load_manifest
from archipelago.data.shards import read_holdout
from tests.data.test_data_latents import save_tiny_vae
from tests.data.test_data_pretrained_embedders import save_tiny_vision
from tests.data.test_data_scale import write_folder

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_imagefolder_latents_config_on_s3(s3_env, tmp_path, cli):
    write_folder(f"{s3_env}/images", per_class=16, bad=1)
    sets = ["--set", f"data.path={s3_env}/images", "--set", f"data.vae.path={save_tiny_vae(tmp_path / 'vae')}",
            "--set", f"data.embedder_weights={save_tiny_vision('clip', tmp_path / 'clip')}",
            "--set", "data.image_size=16", "--set", "data.num_clusters=2", "--set", "data.chunk_mb=0.002",
            "--set", "data.prepare_batch=10", "--set", f"storage.root={s3_env}/run"]
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    p = cli("data", "prepare", "--config", "configs/imagefolder-latents.yaml", *sets, env=env)
    assert p.returncode == 0, p.stderr
    m = load_manifest(f"{s3_env}/run/data")
    assert m.bad_images == 1 and m.num_samples + m.holdout.count == 48 and m.holdout.count == 5
    assert m.embedder == "clip" and m.image_shape == [4, 8, 8]
    assert read_holdout(f"{s3_env}/run/data").images.shape[1:] == (4, 8, 8)   # held out as latents too
    assert all(len(s.chunks or []) > 1 for s in m.shards)

    tiny = ["--set", "expert.hidden_size=32", "--set", "expert.depth=1", "--set", "expert.num_heads=2",
            "--set", "expert.steps=3", "--set", "expert.batch_size=8", "--set", "expert.warmup_steps=1",
            "--set", "expert.checkpoint_every=2"]
    p = cli("train-expert", "--shard", "1", "--config", "configs/imagefolder-latents.yaml", *sets, *tiny, env=env)
    assert p.returncode == 0, p.stderr
    final = f"{s3_env}/run/experts/expert-1/final"
    grid = tmp_path / "grid.png"
    p = cli("generate", "--expert", final, "--n", "4", "--steps", "2", "--out", str(grid), env=env)
    assert p.returncode == 0, p.stderr
    with Image.open(grid) as im:
        assert im.mode == "RGB" and im.size == ((2 * 17 + 1) * 4,) * 2     # decoded 16x16 RGB tiles
