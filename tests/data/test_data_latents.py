"""Latent diffusion end to end with a tiny random AutoencoderKL saved to disk like a real one: images ->
latents in the shards (manifest records the VAE) -> an expert trained a few steps -> a decoded PNG grid from
the real CLI, in one process and with a parallel mode; other VAEs and pixel configs are refused."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from archipelago.config import ArchipelagoConfig, DataConfig, VaeConfig
from archipelago.data import prepare_data, read_shard
from archipelago.data.latents import VaeCodec, vae_sha256
from archipelago.errors import CheckpointError, DataError


def save_tiny_vae(path: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-level AutoencoderKL (16x16 RGB -> 4x8x8), written with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16)
    vae.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def _cfg(vae_dir: Path | None, root: Path) -> ArchipelagoConfig:
    data = {"num_clusters": 2, "image_size": 16, "seed": 0}
    if vae_dir is not None:
        data["vae"] = {"path": str(vae_dir), "batch_size": 256}
    return ArchipelagoConfig.model_validate({
        "name": "latents", "data": data, "storage": {"root": str(root)},
        "expert": {"hidden_size": 32, "depth": 1, "num_heads": 2, "patch_size": 2, "steps": 3, "batch_size": 16,
                   "warmup_steps": 1, "checkpoint_every": 1, "log_every": 1}})


def test_codec_round_trip_shapes_and_identity(vae_dir, tmp_path):
    codec = VaeCodec(VaeConfig(path=str(vae_dir)))
    x = torch.rand(5, 1, 16, 16) * 2 - 1                       # grayscale goes in as RGB
    z = codec.encode(x)
    assert z.shape == (5, 4, 8, 8) and torch.isfinite(z).all()
    assert torch.equal(z, codec.encode(x))                    # posterior mean: deterministic
    raw = codec.vae.encode(x.repeat(1, 3, 1, 1)).latent_dist.mean
    assert torch.allclose(z, raw * codec.vae.config.scaling_factor, atol=1e-6)   # scaled by the VAE's factor
    y = codec.decode(z)
    assert y.shape == (5, 3, 16, 16) and y.abs().max() <= 1.0
    other = save_tiny_vae(tmp_path / "other", seed=1)
    assert vae_sha256(other) != codec.sha256 == vae_sha256(vae_dir)
    with pytest.raises(DataError, match="does not exist.*nothing is downloaded"):
        VaeCodec(VaeConfig(path=str(tmp_path / "nope")))


def test_latents_train_and_decode_end_to_end(vae_dir, tmp_path, cli):
    from archipelago.experts.train import train_expert

    cfg = _cfg(vae_dir, tmp_path / "run")
    data = str(tmp_path / "data")
    m = prepare_data(cfg.data, data, progress=False)
    assert m.image_shape == [4, 8, 8] and m.latent is not None
    assert m.latent.vae_sha256 == vae_sha256(vae_dir) and m.latent.latent_shape == [4, 8, 8]
    assert m.latent.pixel_shape == [3, 16, 16] and m.latent.scaling_factor == pytest.approx(0.18215)
    assert read_shard(data, 0).images.shape[1:] == (4, 8, 8)

    # The expert sees C x H x W = the latent shape from the manifest.
    out = str(tmp_path / "expert-0")
    res = train_expert(cfg, 0, data, out)
    assert res["steps"] == 3 and res["final_checkpoint"]
    from archipelago.experts.checkpoint import read_meta

    meta = read_meta(res["final_checkpoint"])
    assert meta["model"]["args"]["in_channels"] == 4 and meta["model"]["args"]["input_size"] == 8
    assert meta["data_space"]["kind"] == "latent" and meta["data_space"]["vae_sha256"] == m.latent.vae_sha256

    # generate decodes with the recorded VAE: a grid of 16x16 RGB tiles, not 8x8 latents.
    grid = tmp_path / "grid.png"
    p = cli("generate", "--expert", res["final_checkpoint"], "--n", "4", "--steps", "2", "--out", str(grid))
    assert p.returncode == 0, p.stderr
    with Image.open(grid) as im:                              # 2x2 tiles of 16 px, 1 px padding, scale 4
        assert im.mode == "RGB" and im.size == ((2 * 17 + 1) * 4,) * 2   # (8 px latents would give 76)

    # ... and so does a parallel mode (sampling across 2 ranks, decoding after the launcher returns).
    pgrid = tmp_path / "pgrid.png"
    p = cli("generate", "--expert", res["final_checkpoint"], "--n", "4", "--steps", "2", "--out", str(pgrid),
            "--parallel", "sync_patch", "--world-size", "2", "--launcher", "local")
    assert p.returncode == 0, p.stderr
    with Image.open(grid) as a, Image.open(pgrid) as b:
        assert a.size == b.size

    # Another VAE is refused with one line, before sampling.
    other = save_tiny_vae(tmp_path / "other-vae", seed=1)
    p = cli("generate", "--expert", res["final_checkpoint"], "--n", "2", "--out", str(tmp_path / "x.png"),
            "--vae", str(other))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "is another one" in p.stderr and not (tmp_path / "x.png").exists()

    # Resuming the latent run with a pixel config (and its pixel data) is refused with one line.
    pixel = _cfg(None, tmp_path / "run")
    pdata = str(tmp_path / "pixel-data")
    prepare_data(pixel.data, pdata, progress=False)
    train_expert(cfg, 0, data, out, max_steps=1, resume=False)    # leave a periodic checkpoint
    with pytest.raises(CheckpointError, match="trained on latents of VAE .* this run's data holds pixels"):
        train_expert(pixel, 0, pdata, out)


def test_latents_refused_for_video(vae_dir, tmp_path):
    cfg = DataConfig(source="moving_digits", num_videos=8, video_frames=2, video_size=16, num_clusters=2,
                     vae=VaeConfig(path=str(vae_dir)))
    with pytest.raises(DataError, match="video sources are not supported"):
        prepare_data(cfg, str(tmp_path / "d"), progress=False)
