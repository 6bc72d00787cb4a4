"""The held-out split (never in a shard, the same for every K/embedder/partitioner of a source), the per-shard
class counts behind sample-once routing, and the semantic `classifier` embedder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from archipelago.config import DataConfig
from archipelago.data import load_manifest, prepare_data, read_shard
from archipelago.data.embedders import get_embedder
from archipelago.data.partition import class_counts, class_majority_share
from archipelago.data.shards import HOLDOUT_FILE, read_holdout
from archipelago.errors import DataError


def _indices(url: str) -> tuple[set[int], set[int]]:
    m = load_manifest(url)
    shard = {int(i) for k in range(m.num_clusters) for i in read_shard(url, k).index}
    return shard, {int(i) for i in read_holdout(url).index}


def test_holdout_is_never_in_a_shard_and_does_not_depend_on_k(tmp_path):
    a, b = str(tmp_path / "k2"), str(tmp_path / "k5r")
    ma = prepare_data(DataConfig(num_clusters=2, holdout_fraction=0.2), a, progress=False)
    mb = prepare_data(DataConfig(num_clusters=5, partitioner="random", holdout_fraction=0.2), b, progress=False)
    sa, ha = _indices(a)
    sb, hb = _indices(b)
    assert ma.holdout.count == mb.holdout.count == 359 and len(ha) == 359
    assert sa.isdisjoint(ha) and sa | ha == set(range(1797))
    assert ha == hb and sa == sb                    # same held-out samples whatever K or partitioner
    # Class counts: per shard and class, summing to the shard sizes; classes spread over the shards.
    table = np.array(mb.class_counts)
    assert table.shape == (5, 10) and table.sum(1).tolist() == mb.counts
    assert mb.class_majority_share == pytest.approx(class_majority_share(table))
    # The held-out split is checked like a shard: corrupt it and the data no longer verifies.
    (tmp_path / "k2" / HOLDOUT_FILE).write_bytes(b"x")
    with pytest.raises(DataError, match="held-out|sha256"):
        read_holdout(a)


def test_no_holdout_when_disabled(tmp_path):
    url = str(tmp_path / "d")
    m = prepare_data(DataConfig(num_clusters=2, holdout_fraction=0.2), url, progress=False)
    assert (tmp_path / "d" / HOLDOUT_FILE).exists()
    m = prepare_data(DataConfig(num_clusters=2, holdout_fraction=0.0), url, progress=False)
    assert m.holdout is None and m.num_samples == 1797 and read_holdout(url) is None
    assert not (tmp_path / "d" / HOLDOUT_FILE).exists()   # a stale held-out file is not left behind


def test_class_majority_share_bounds():
    assert class_majority_share(np.array([[5, 0], [0, 7]])) == 1.0
    assert class_majority_share(np.array([[5, 5], [5, 5]])) == 0.5
    t = class_counts(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2, 3)
    assert t.tolist() == [[1, 1, 0], [0, 2, 0]]


def test_classifier_embedder_concentrates_classes_more_than_pixel_pca(tmp_path):
    """The semantic stand-in for DINOv2: each class mostly in one shard (measured 0.86 vs 0.76 at K=4)."""
    pca = prepare_data(DataConfig(num_clusters=4), str(tmp_path / "p"), progress=False)
    sem = prepare_data(DataConfig(num_clusters=4, embedder="classifier"), str(tmp_path / "c"), progress=False)
    assert sem.embedder == "classifier" and sem.holdout.count == pca.holdout.count
    assert sem.class_majority_share > pca.class_majority_share + 0.05, (sem.class_majority_share,
                                                                       pca.class_majority_share)
    assert max(sem.counts) / min(sem.counts) <= 2.0      # the balance constraint still holds


def test_classifier_embedder_needs_labels():
    emb = get_embedder("classifier", DataConfig())
    with pytest.raises(DataError, match="labelled"):
        emb.embed(torch.zeros(8, 1, 16, 16), labels=torch.zeros(8, dtype=torch.long), num_classes=1)
    with pytest.raises(DataError, match="video"):
        emb.embed(torch.zeros(8, 1, 4, 16, 16), labels=torch.arange(8) % 2, num_classes=2)
