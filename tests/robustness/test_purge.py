"""Checkpoint purge is crash-safe and a new run starts clean:

- a purge that dies half-way (the deletion raises after it began, as a SIGKILL would leave it) never leaves a
  checkpoint that is listed but incomplete: locally the directory leaves the listing atomically (rename)
  before its files go; on S3 (moto) meta.json, the commit marker, goes first;
- the next run (which holds the lease, so nobody else writes there) deletes the temporary files of
  interrupted atomic writes, checkpoint directories without meta.json and cut-short purges, then trains on.
"""
from __future__ import annotations

import shutil

import pytest
from robustness_support import copy_tree, tiny_config


def _train(data, out, **expert):
    from archipelago.experts.train import train_expert

    return train_expert(tiny_config(expert={"steps": 6, "checkpoint_every": 1, "keep_checkpoints": 2, **expert}),
                        0, str(data), str(out))


def test_a_purge_cut_short_never_lists_a_half_deleted_checkpoint(artifacts, tmp_path, monkeypatch,
                                                                  record_property):
    import archipelago.experts.checkpoint as ckpt

    data = copy_tree(artifacts.data, tmp_path / "data")
    out = tmp_path / "run"
    _train(data, out, steps=4, keep_checkpoints=3)
    manager = ckpt.CheckpointManager(str(out), keep=1)
    before = manager.complete_steps()
    assert len(before) >= 2

    def dies_half_way(path, *a, **k):          # the process "dies" after the rename, before the files go
        raise KeyboardInterrupt("killed while deleting")
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(ckpt.shutil, "rmtree", dies_half_way)
        manager.purge()
    listed = manager.steps()
    assert listed == before[1:], (listed, before)                             # the doomed one is not listed
    assert all((out / "checkpoints" / f"step-{s:08d}" / "meta.json").exists() for s in listed)
    assert manager.latest() == manager.step_url(before[-1])
    leftovers = list((out / "checkpoints").glob(".purging-*"))
    assert leftovers, "the cut-short purge should have left its renamed directory"

    # ---- a new run cleans what was left (and temp files of interrupted writes), then finishes -------------
    (out / "checkpoints" / "step-00000099").mkdir()                           # no meta.json: incomplete
    (out / "checkpoints" / "step-00000099" / "model.safetensors").write_bytes(b"half")
    tmp_file = out / "checkpoints" / f"step-{before[-1]:08d}" / ".ema.safetensors.x1y2.tmp"
    tmp_file.write_bytes(b"partial")
    (out / ".metrics.jsonl.abc.tmp").write_bytes(b"partial")
    res = _train(data, out, steps=5)
    assert res["final_checkpoint"] and res["start_step"] == before[-1]
    assert not list(out.rglob("*.tmp")) and not list((out / "checkpoints").glob(".purging-*"))
    assert not (out / "checkpoints" / "step-00000099").exists()
    record_property("robustness: interrupted purges and stale temp files cleaned", 1)


def test_a_purge_cut_short_on_s3_removes_the_commit_marker_first(artifacts, s3_env, tmp_path, monkeypatch,
                                                                 record_property):
    import archipelago.experts.checkpoint as ckpt
    from archipelago import storage

    data = f"{s3_env}/data"
    storage.upload_dir(artifacts.data, data)
    out = f"{s3_env}/run"
    _train(data, out, steps=4, keep_checkpoints=3)
    manager = ckpt.CheckpointManager(out, keep=1)
    before = manager.complete_steps()
    real_remove = storage.remove

    def remove(url, recursive=False):
        if recursive:
            raise KeyboardInterrupt("killed while deleting")
        real_remove(url, recursive)
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(ckpt.storage, "remove", remove)
        manager.purge()
    assert manager.complete_steps() == before[1:]          # the half-deleted one is no longer complete
    assert manager.latest() == manager.step_url(before[-1])
    res = _train(data, out, steps=5)                       # the next run removes the incomplete directory
    assert res["final_checkpoint"] and res["start_step"] == before[-1]
    assert before[0] not in manager.steps()
    record_property("robustness: interrupted purges and stale temp files cleaned", 1)
    shutil.rmtree(tmp_path, ignore_errors=True)
