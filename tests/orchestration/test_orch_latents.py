"""`archipelago train` (the quickstart's pipeline, real Ray Train islands beside the router) on data at scale:
an image folder prepared into chunked shards of VAE latents, islands and router streaming their chunks, and
the pipeline's grid decoded to pixels by the same VAE."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.data.test_data_latents import save_tiny_vae
from tests.data.test_data_scale import write_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
@pytest.mark.timeout(500)
def test_pipeline_trains_on_streamed_latent_chunks(make_config, tmp_path):
    write_folder(str(tmp_path / "img"), per_class=16)
    root = tmp_path / "run"
    cfg = make_config(root, data={"source": "image_folder", "path": str(tmp_path / "img"), "image_size": 16,
                                  "num_clusters": 2, "shard_format": "chunked", "chunk_mb": 0.002,
                                  "prepare_batch": 16, "embed_dim": 4,
                                  "vae": {"path": str(save_tiny_vae(tmp_path / "vae"))}},
                      tracking={"enabled": False})
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "archipelago.cli", "train", "--config", str(conf)], check=False,
                         capture_output=True, text=True, env=env, timeout=450, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    from archipelago.data import load_manifest
    from archipelago.ensemble import load_ensemble

    m = load_manifest(str(root / "data"))
    assert m.latent is not None and all(len(s.chunks or []) > 1 for s in m.shards)
    ens = load_ensemble(str(root / "ensemble.json"))
    assert ens.data_space["kind"] == "latent" and ens.image_shape == (4, 8, 8)
    grid = min((root / "samples").glob("*.png"))
    with Image.open(grid) as im:                    # 16 samples: 4x4 tiles of decoded 16x16 RGB images
        assert im.mode == "RGB" and im.size == ((4 * 17 + 1) * 4,) * 2
