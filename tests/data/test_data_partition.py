"""Balanced k-means and random partitioners, and the cluster purity metric, on real digits features."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archipelago.config import DataConfig
from archipelago.data import cluster_purity, kmeans_partition, partition, random_partition
from archipelago.data.partition import rebalance, size_bounds
from archipelago.errors import DataError

# Measured on the default setup (16x16 digits, pixel_pca dim 32, seed 0, K=10, max_imbalance 2): 0.687;
# seeds 0-5 gave 0.595-0.694. The floor sits a safe margin below that and far above chance (0.1).
PURITY_FLOOR = 0.55


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_kmeans_shards_respect_max_imbalance(digits_emb, k):
    p = kmeans_partition(digits_emb, k, seed=0, max_imbalance=2.0)
    assert sum(p.counts) == len(digits_emb) and len(p.counts) == k
    assert np.bincount(p.assign, minlength=k).tolist() == p.counts
    assert max(p.counts) / min(p.counts) <= 2.0
    assert p.centroids.shape == (k, digits_emb.shape[1])


@pytest.mark.parametrize("ratio", [1.0, 1.2, 1.5])
def test_kmeans_tight_imbalance(digits_emb, ratio):
    p = kmeans_partition(digits_emb, 8, seed=1, max_imbalance=ratio)
    lo, hi = size_bounds(len(digits_emb), 8, ratio)
    assert lo <= min(p.counts) and max(p.counts) <= hi
    # 1797 = 8 * 224 + 5: at ratio 1 the tightest split (225/224) is the best any integer split can do.
    assert max(p.counts) / min(p.counts) <= max(ratio, 225 / 224)


def test_rebalance_keeps_kmeans_structure(digits_emb):
    """Rebalancing moves few points: most keep their k-means cluster, so shards stay semantic."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=8, n_init=4, random_state=0).fit(digits_emb)
    p = kmeans_partition(digits_emb, 8, seed=0, max_imbalance=2.0)
    assert (p.assign == km.labels_).mean() > 0.8


@settings(max_examples=40, deadline=None, database=None)
@given(n=st.integers(2, 120), k=st.integers(1, 12), ratio=st.floats(1.0, 4.0), seed=st.integers(0, 10**6),
       skew=st.booleans())
def test_rebalance_always_reaches_bounds(n, k, ratio, seed, skew):
    k = min(k, n)
    rng = np.random.default_rng(seed)
    sqdist = rng.random((n, k))
    start = np.zeros(n, dtype=np.int64) if skew else rng.integers(0, k, n)  # skew: everyone in cluster 0
    lo, hi = size_bounds(n, k, ratio)
    assert lo * k <= n <= hi * k and lo >= 1
    counts = np.bincount(rebalance(sqdist, start, lo, hi), minlength=k)
    assert counts.sum() == n and counts.min() >= lo and counts.max() <= hi
    if np.ceil(n / k) <= ratio * np.floor(n / k):  # a feasible bound is always met
        assert counts.max() / counts.min() <= ratio + 1e-9


def test_kmeans_is_deterministic_by_seed(digits_emb):
    a = kmeans_partition(digits_emb, 8, seed=5)
    b = kmeans_partition(digits_emb, 8, seed=5)
    assert np.array_equal(a.assign, b.assign) and np.array_equal(a.centroids, b.centroids)


def test_random_partition_balanced_and_seeded(digits_emb):
    a = random_partition(digits_emb, 4, seed=0)
    b = random_partition(digits_emb, 4, seed=0)
    c = random_partition(digits_emb, 4, seed=1)
    assert np.array_equal(a.assign, b.assign)
    assert not np.array_equal(a.assign, c.assign)
    assert max(a.counts) - min(a.counts) <= 1 and sum(a.counts) == len(digits_emb)


def test_kmeans_purity_on_digits(digits, digits_emb):
    labels = digits.labels.numpy()
    km = partition(digits_emb, DataConfig(num_clusters=10))
    rnd = partition(digits_emb, DataConfig(num_clusters=10, partitioner="random"))
    purity_km, purity_rnd = cluster_purity(km.assign, labels), cluster_purity(rnd.assign, labels)
    print(f"digits K=10 purity: kmeans {purity_km:.3f}, random {purity_rnd:.3f}, "
          f"kmeans imbalance {km.imbalance:.2f}")
    assert purity_km >= PURITY_FLOOR
    assert purity_rnd < 0.2          # random sharding carries no class structure
    assert purity_km > purity_rnd + 0.4


def test_cluster_purity_exact_values():
    assert cluster_purity(np.array([0, 0, 1, 1]), np.array([3, 3, 5, 5])) == 1.0
    assert cluster_purity(np.array([0, 0, 0, 1]), np.array([1, 2, 2, 0])) == 0.75
    assert cluster_purity(np.zeros(10, dtype=int), np.arange(10) % 2) == 0.5
    with pytest.raises(DataError):
        cluster_purity(np.array([0, 1]), np.array([0]))


def test_k_larger_than_samples_names_the_field():
    emb = np.random.default_rng(0).random((5, 3)).astype(np.float32)
    for part in ("kmeans", "random"):
        with pytest.raises(DataError, match="data.num_clusters"):
            partition(emb, DataConfig(num_clusters=6, partitioner=part))


# ---- properties of the whole partitioners (rebalance alone is covered above) ---------------------------
_EMB = {"n": st.integers(1, 80), "k": st.integers(1, 12), "seed": st.integers(0, 2**31 - 1),
        "dim": st.integers(1, 5), "ties": st.booleans()}


def _embeddings(n: int, dim: int, seed: int, ties: bool) -> np.ndarray:
    """Gaussian features, or binary ones (at most 2**dim distinct points: duplicates, fewer points than K)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, (n, dim)) if ties else rng.normal(size=(n, dim))).astype(np.float32)


@pytest.mark.filterwarnings("ignore:Number of distinct clusters")   # ties: fewer distinct points than K
@settings(max_examples=25, deadline=None, database=None)
@given(ratio=st.floats(1.0, 4.0), **_EMB)
def test_kmeans_partition_any_k_any_seed(n, k, seed, dim, ties, ratio):
    emb = _embeddings(n, dim, seed, ties)
    if k > n:
        with pytest.raises(DataError, match="data.num_clusters"):
            kmeans_partition(emb, k, seed=seed, max_imbalance=ratio)
        return
    p = kmeans_partition(emb, k, seed=seed, max_imbalance=ratio, n_init=1)
    counts = np.bincount(p.assign, minlength=k)
    assert len(counts) == k and counts.tolist() == p.counts and counts.sum() == n
    lo, hi = size_bounds(n, k, ratio)
    assert counts.min() >= max(lo, 1) and counts.max() <= hi            # no empty shard, sizes in bounds
    if np.ceil(n / k) <= ratio * np.floor(n / k):                       # a feasible bound is always met
        assert p.imbalance <= ratio + 1e-9
    assert p.centroids.shape == (k, dim) and np.isfinite(p.centroids).all()
    again = kmeans_partition(emb, k, seed=seed, max_imbalance=ratio, n_init=1)
    assert np.array_equal(p.assign, again.assign)                       # same seed, same shards


@settings(max_examples=40, deadline=None, database=None)
@given(**_EMB)
def test_random_partition_any_k_any_seed(n, k, seed, dim, ties):
    emb = _embeddings(n, dim, seed, ties)
    if k > n:
        with pytest.raises(DataError, match="data.num_clusters"):
            random_partition(emb, k, seed=seed)
        return
    p = random_partition(emb, k, seed=seed)
    counts = np.bincount(p.assign, minlength=k)
    assert len(counts) == k and counts.tolist() == p.counts and counts.sum() == n
    assert counts.max() - counts.min() <= 1 and counts.min() >= 1       # balanced to one sample
    assert np.array_equal(p.assign, random_partition(emb, k, seed=seed).assign)
