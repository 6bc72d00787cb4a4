"""prepare_data end to end: idempotence, determinism, memory:// URLs, video, and up-front validation."""
from __future__ import annotations

import time

import fsspec
import pytest

from archipelago import storage
from archipelago.config import DataConfig
from archipelago.data import load_manifest, manifest_sha256, prepare_data, read_all, read_shard
from archipelago.data.shards import read_holdout
from archipelago.errors import DataError


def _mtimes(path):
    return {p.name: p.stat().st_mtime_ns for p in sorted(path.iterdir())}


def test_prepare_is_idempotent(tmp_path):
    cfg = DataConfig(num_clusters=3, seed=0)
    out = tmp_path / "d"
    m1 = prepare_data(cfg, str(out), progress=True)  # exercises the rich progress bar too
    before = _mtimes(out)
    assert set(before) == {"manifest.json", "holdout.safetensors", "shard-000.safetensors",
                           "shard-001.safetensors", "shard-002.safetensors"}
    time.sleep(0.01)
    m2 = prepare_data(cfg, str(out), progress=False)
    assert m2 == m1 and _mtimes(out) == before  # reused: nothing rewritten


def test_prepare_rebuilds_corrupt_or_changed_data(tmp_path):
    small = {"source": "moving_digits", "num_videos": 40, "video_frames": 4, "video_size": 16, "embed_dim": 4}
    out = tmp_path / "d"
    m1 = prepare_data(DataConfig(num_clusters=4, **small), str(out), progress=False)
    (out / "shard-001.safetensors").write_bytes(b"garbage")
    m2 = prepare_data(DataConfig(num_clusters=4, **small), str(out), progress=False)
    assert m2 == m1 and read_shard(str(out), 1).labels.shape[0] == m1.counts[1]
    # Another config (fewer shards) replaces the data and cleans up shards the new manifest does not list.
    m3 = prepare_data(DataConfig(num_clusters=2, **small), str(out), progress=False)
    assert m3.num_clusters == 2 and m3.data_config_hash != m1.data_config_hash
    assert sorted(p.name for p in out.iterdir()) == ["holdout.safetensors", "manifest.json",
                                                     "shard-000.safetensors", "shard-001.safetensors"]


def test_same_seed_same_shards_different_seed_differs(tmp_path):
    a = prepare_data(DataConfig(num_clusters=4, seed=0), str(tmp_path / "a"), progress=False)
    b = prepare_data(DataConfig(num_clusters=4, seed=0), str(tmp_path / "b"), progress=False)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert manifest_sha256(str(tmp_path / "a")) == manifest_sha256(str(tmp_path / "b"))
    r1 = prepare_data(DataConfig(num_clusters=4, seed=1, partitioner="random"), str(tmp_path / "r1"),
                      progress=False)
    r2 = prepare_data(DataConfig(num_clusters=4, seed=2, partitioner="random"), str(tmp_path / "r2"),
                      progress=False)
    assert [s.sha256 for s in r1.shards] != [s.sha256 for s in r2.shards]
    assert r1.purity < 0.2 < a.purity  # random shards mix classes; k-means shards do not


def test_prepare_to_memory_url():
    url = "memory://archipelago-test-prepare/data"
    try:
        m = prepare_data(DataConfig(num_clusters=2, seed=0), url, progress=False)
        assert storage.exists(storage.join(url, "manifest.json"))
        assert load_manifest(url) == m
        images, _, cluster_ids = read_all(url)
        assert images.shape[0] + m.holdout.count == 1797 and cluster_ids.max() == 1
        fs = fsspec.filesystem("memory")
        stamp = {p: fs.info(p)["created"] for p in fs.find("/archipelago-test-prepare")}
        assert prepare_data(DataConfig(num_clusters=2, seed=0), url, progress=False) == m
        assert {p: fs.info(p)["created"] for p in fs.find("/archipelago-test-prepare")} == stamp
    finally:
        storage.remove("memory://archipelago-test-prepare", recursive=True)


def test_prepare_moving_digits_video(tmp_path):
    cfg = DataConfig(source="moving_digits", num_videos=40, video_frames=16, video_size=32, num_clusters=2,
                     embed_dim=8)
    m = prepare_data(cfg, str(tmp_path / "v"), progress=False)
    assert m.image_shape == [1, 16, 32, 32] and m.num_samples + m.holdout.count == 40 and max(m.counts) / min(m.counts) <= 2
    s = read_shard(str(tmp_path / "v"), 0)
    assert s.images.shape[1:] == (1, 16, 32, 32)


def test_k_larger_than_samples(tmp_path):
    cfg = DataConfig(source="moving_digits", num_videos=3, num_clusters=4)
    with pytest.raises(DataError) as exc:
        prepare_data(cfg, str(tmp_path / "x"), progress=False)
    assert "data.num_clusters=4" in str(exc.value) and "(3)" in str(exc.value)
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_prepare_image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    cfg = DataConfig(source="image_folder", path=str(tmp_path / "imgs"), image_size=8, num_clusters=2,
                     embed_dim=4)
    m = prepare_data(cfg, str(tmp_path / "out"), progress=False)
    assert m.image_shape == [3, 8, 8] and m.num_classes == 2 and m.num_samples == 8
    assert m.source.startswith("image_folder:")


@pytest.mark.e2e
def test_prepare_to_s3_moto(s3_env):
    """Through a real S3 API (moto_server): write, reuse, verify, and detect a tampered object."""
    url = f"{s3_env}/data"
    m = prepare_data(DataConfig(num_clusters=2, seed=0), url, progress=False)
    assert load_manifest(url) == m
    assert prepare_data(DataConfig(num_clusters=2, seed=0), url, progress=False) == m  # reused
    images, _, cluster_ids = read_all(url)
    assert images.shape == (1797 - m.holdout.count, 1, 16, 16) and cluster_ids.unique().tolist() == [0, 1]
    held = read_holdout(url)  # the held-out split travels through S3 too, checksummed like a shard
    assert held is not None and held.images.shape[0] == m.holdout.count > 0
    storage.write_bytes(storage.join(url, "shard-001.safetensors"), b"tampered")
    with pytest.raises(DataError, match="shard-001.safetensors"):
        read_shard(url, 1)
