"""Data at scale for real: image folders and WebDataset tars read lazily from a moto S3 server, bad images
skipped (counted) or failed (named), MiniBatchKMeans with the balance bound, chunked shards streamed through
a shuffle buffer, streamed training, and a `data prepare` killed mid-run that resumes to the same manifest."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from archipelago import storage
from archipelago.config import ArchipelagoConfig, DataConfig
from archipelago.data import load_manifest, prepare_data, read_shard, verify_shards
from archipelago.data.chunks import ChunkStream, chunk_refs
from archipelago.data.partition import size_bounds
from archipelago.data.shards import read_holdout
from archipelago.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def _png(cls: int, i: int, size: int = 12) -> bytes:
    """A small RGB picture whose colour/shape depends on the class (so clusters exist)."""
    rng = np.random.default_rng(cls * 10_000 + i)
    a = np.zeros((size, size, 3), np.uint8)
    a[..., cls % 3] = 150 + rng.integers(0, 100)
    a[rng.integers(0, size // 2):, : size // 2 + cls] = rng.integers(0, 80)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(url: str, per_class: int, classes: int = 3, bad: int = 0) -> None:
    for c in range(classes):
        for i in range(per_class):
            storage.write_bytes(storage.join(url, f"class{c}", f"{i:05d}.png"), _png(c, i))
    for j in range(bad):
        storage.write_bytes(storage.join(url, "class0", f"broken-{j}.png"), b"\x89PNG not really")


def _cfg(path: str, **kw) -> DataConfig:
    base = {"source": "image_folder", "path": path, "image_size": 8, "num_clusters": 2,
            "shard_format": "chunked", "chunk_mb": 0.004, "prepare_batch": 16, "embed_dim": 4}
    return DataConfig(**{**base, **kw})


def test_image_folder_on_s3_streamed_with_bad_images(s3_env):
    src, out = f"{s3_env}/images", f"{s3_env}/data"
    write_folder(src, per_class=20, bad=2)
    m = prepare_data(_cfg(src, on_bad_image="skip"), out, progress=False)
    assert m.bad_images == 2 and m.num_classes == 3 and m.image_shape == [3, 8, 8]
    assert m.holdout is not None and m.num_samples + m.holdout.count == 60 and m.holdout.count == 6
    lo, hi = size_bounds(54, 2, 2.0)
    assert sum(m.counts) == 54 and lo <= min(m.counts) and max(m.counts) <= hi
    assert m.purity is not None and m.purity > 0.5
    row_bytes = 3 * 8 * 8 * 4 + 16
    for info in m.shards:                                   # bounded chunks, each with its sha256
        assert info.chunks and len(info.chunks) > 1
        assert all(c.count * row_bytes <= 0.004 * 2**20 for c in info.chunks)
    verify_shards(out)
    assert not storage.exists(f"{out}/.staging")            # staging is removed once the manifest is written

    # A stream over S3 visits every sample of the shard once per epoch, disjointly across ranks.
    whole = read_shard(out, 0)
    refs = chunk_refs(out, m.shards[0])
    seen = []
    for rank in range(2):
        s = ChunkStream(refs, rank=rank, world_size=2, seed=3, buffer=8)
        seen.append(s.next_rows(s.epoch_rows(0))[0])
        s.close()
    got = torch.cat(seen)
    assert got.shape[0] == len(whole)
    key = lambda t: sorted(map(tuple, t.flatten(1).tolist()))
    assert key(got) == key(whole.images)

    with pytest.raises(DataError, match=r"broken-0\.png: not a readable image.*on_bad_image=skip"):
        prepare_data(_cfg(src, on_bad_image="fail"), f"{s3_env}/data-fail", progress=False)


def test_webdataset_tars_with_labels(tmp_path):
    for t in range(2):
        with tarfile.open(tmp_path / f"shard-{t}.tar", "w") as tf:
            for i in range(15):
                c = (t * 15 + i) % 3
                for name, data in ((f"s{t}_{i:03d}.png", _png(c, i)), (f"s{t}_{i:03d}.cls", str(c).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    m = prepare_data(_cfg(str(tmp_path / "*.tar"), source="webdataset", shard_format="single"),
                     str(tmp_path / "out"), progress=False)
    assert m.num_samples + m.holdout.count == 30 and m.num_classes == 3 and m.source.startswith("webdataset:")
    labels = torch.cat([read_shard(str(tmp_path / "out"), k).labels for k in range(2)]
                       + [read_holdout(str(tmp_path / "out")).labels])
    assert sorted(labels.tolist()) == sorted([(i) % 3 for i in range(30)])


def test_stream_batches_are_a_function_of_the_step(tmp_path):
    write_folder(str(tmp_path / "img"), per_class=12)
    out = str(tmp_path / "data")
    m = prepare_data(_cfg(str(tmp_path / "img")), out, progress=False)
    refs = chunk_refs(out, m.shards[1])
    a = ChunkStream(refs, seed=1, buffer=5)
    seq = [a.batch(i, 7) for i in range(8)]                 # crosses epoch boundaries
    b = ChunkStream(refs, seed=1, buffer=5)
    for i in (5, 2, 7):                                      # a resumed run jumps straight to step i
        assert all(torch.equal(x, y) for x, y in zip(b.batch(i, 7), seq[i]))
    epoch = torch.cat([s[0] for s in seq])[: a.epoch_rows(0)]
    assert not torch.equal(epoch, read_shard(out, 1).images)   # shuffled ...
    a.close()
    b.close()


def test_streamed_training_on_chunked_shards(tmp_path):
    from archipelago.experts.train import train_expert

    write_folder(str(tmp_path / "img"), per_class=12)
    data = str(tmp_path / "data")
    prepare_data(_cfg(str(tmp_path / "img")), data, progress=False)
    cfg = ArchipelagoConfig.model_validate({
        "data": _cfg(str(tmp_path / "img")).model_dump() | {"loader": "stream", "shuffle_buffer": 8},
        "expert": {"hidden_size": 32, "depth": 1, "num_heads": 2, "steps": 4, "batch_size": 8, "warmup_steps": 1,
                   "checkpoint_every": 2, "log_every": 1}})
    res = train_expert(cfg, 0, data, str(tmp_path / "e0"))
    assert res["steps"] == 4 and np.isfinite(res["final_loss"])
    with pytest.raises(DataError, match="data.loader=stream needs chunked shards"):
        pix = cfg.model_copy(deep=True)
        pix.data.shard_format = "single"
        prepare_data(pix.data, str(tmp_path / "single"), progress=False)
        train_expert(pix, 0, str(tmp_path / "single"), str(tmp_path / "e1"))


@pytest.mark.e2e
def test_killed_prepare_resumes_to_the_same_manifest(tmp_path):
    write_folder(str(tmp_path / "img"), per_class=800)      # 2,400 images, 150 staged parts of 16
    cfg = {"data": _cfg(str(tmp_path / "img")).model_dump(mode="json"), "storage": {"root": str(tmp_path)}}
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "archipelago.cli", "data", "prepare", "--config", str(conf)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    part = killed / ".staging" / "part-000004.safetensors"
    deadline = time.time() + 120
    while not part.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "manifest.json").exists()
    staged = len(list((killed / ".staging").glob("part-*.safetensors")))
    assert 5 <= staged < 150

    done = subprocess.run([*cmd, "--out", str(killed)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    clean = subprocess.run([*cmd, "--out", str(tmp_path / "clean")], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=300, check=False)
    assert clean.returncode == 0, clean.stderr
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("killed", "clean"))
    m = load_manifest(str(killed))
    assert a == b and m.num_samples + m.holdout.count == 2400
    verify_shards(str(killed))


@pytest.mark.parametrize("partitioner", ["kmeans", "random"])
def test_streamed_prepare_holds_out_a_split_and_counts_classes(tmp_path, partitioner):
    """The streamed path gives what the in-RAM one gives: a held-out split in no shard (not clustered either),
    per-shard class counts that match the shards' labels (sample-once routing needs them)."""
    write_folder(str(tmp_path / "img"), per_class=20)
    out = str(tmp_path / "data")
    m = prepare_data(_cfg(str(tmp_path / "img"), partitioner=partitioner, holdout_fraction=0.2), out,
                     progress=False)
    held = read_holdout(out)
    shards = [read_shard(out, k) for k in range(2)]
    assert m.holdout.count == len(held) == 12 and m.num_samples == sum(m.counts) == 48
    in_shards = set(torch.cat([s.index for s in shards]).tolist())
    assert in_shards.isdisjoint(held.index.tolist()) and len(in_shards | set(held.index.tolist())) == 60
    table = np.array(m.class_counts)
    assert table.shape == (2, 3)
    for k, s in enumerate(shards):
        assert table[k].tolist() == np.bincount(s.labels.numpy(), minlength=3).tolist()
    assert 0 < m.class_majority_share <= 1
    again = prepare_data(_cfg(str(tmp_path / "img"), partitioner=partitioner, holdout_fraction=0.2),
                         str(tmp_path / "again"), progress=False)
    assert read_holdout(str(tmp_path / "again")).index.tolist() == held.index.tolist()   # seeded
    assert again.holdout.sha256 == m.holdout.sha256
    none = prepare_data(_cfg(str(tmp_path / "img"), holdout_fraction=0.0), str(tmp_path / "none"),
                        progress=False)
    assert none.holdout is None and none.num_samples == 60 and read_holdout(str(tmp_path / "none")) is None


def test_router_streams_chunked_shards_with_a_disjoint_holdout(tmp_path):
    from archipelago.data.chunks import heldout_mask, router_stream
    from archipelago.router.train import train_router

    write_folder(str(tmp_path / "img"), per_class=30)
    data = str(tmp_path / "data")
    m = prepare_data(_cfg(str(tmp_path / "img")), data, progress=False)
    stream, (ex, ey, ec) = router_stream(data, m, seed=0, buffer=16, holdout=0.1)
    _, _, c, idx = stream.next_rows(200)
    assert not heldout_mask(idx, 0, 0.1).any() and 0 < ex.shape[0] < 30     # never trains on held-out rows
    assert set(c.tolist()) == {0, 1} and ec.shape == ey.shape == (ex.shape[0],)
    stream.close()
    cfg = ArchipelagoConfig.model_validate({"data": _cfg(str(tmp_path / "img")).model_dump(),
                                            "router": {"steps": 5, "batch_size": 16, "hidden_size": 16,
                                                       "depth": 1}})
    res = train_router(cfg, data, str(tmp_path / "router"))
    assert res["steps"] == 5 and np.isfinite(res["final_loss"]) and res["metrics"]


@pytest.mark.e2e
def test_parallel_preparation_with_ray_actors_matches_sequential(tmp_path):
    """prepare_workers=2: Ray actors (a local Ray started by the real CLI) build the staged parts; the shards
    are byte-identical to the in-process run's."""
    write_folder(str(tmp_path / "img"), per_class=30, bad=1)
    seq = prepare_data(_cfg(str(tmp_path / "img"), on_bad_image="skip"), str(tmp_path / "seq"), progress=False)
    cfg = {"data": _cfg(str(tmp_path / "img"), on_bad_image="skip", prepare_workers=2).model_dump(mode="json"),
           "storage": {"root": str(tmp_path)}}
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.run([sys.executable, "-m", "archipelago.cli", "data", "prepare", "--config", str(conf),
                        "--out", str(tmp_path / "par")], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    par = load_manifest(str(tmp_path / "par"))
    assert par.data_config_hash == seq.data_config_hash and par.bad_images == seq.bad_images == 1
    assert [s.sha256 for s in par.shards] == [s.sha256 for s in seq.shards] and par.counts == seq.counts
