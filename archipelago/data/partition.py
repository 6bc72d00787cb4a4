"""Split the dataset into K shards, one per expert. The DDM method clusters a semantic embedding with
k-means; we then rebalance sizes so no island gets a shard much larger than another (`max_imbalance`).
A random balanced split is kept as the ablation the follow-up paper shows degrades quality."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from archipelago.config import DataConfig
from archipelago.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Partition:
    """Which shard each sample goes to."""
    assign: np.ndarray     # int64 [N], shard id in [0, K)
    centroids: np.ndarray  # float32 [K, D], mean embedding of each shard's members
    counts: list[int]      # [K] samples per shard

    @property
    def imbalance(self) -> float:
        """Largest / smallest shard size."""
        return max(self.counts) / max(min(self.counts), 1)


def _check_k(n: int, k: int) -> None:
    if k < 1 or k > n:
        raise DataError(f"data.num_clusters={k} must be between 1 and the number of samples ({n}); "
                        "lower data.num_clusters or use a larger source")


def _shard_means(emb: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    sums = np.zeros((k, emb.shape[1]), dtype=np.float64)
    np.add.at(sums, assign, emb)
    counts = np.bincount(assign, minlength=k).clip(min=1)[:, None]
    return (sums / counts).astype(np.float32)


def size_bounds(n: int, k: int, max_imbalance: float) -> tuple[int, int]:
    """(lo, hi) shard sizes with lo*K <= N <= hi*K and hi/lo <= max_imbalance.

    The slack is split evenly around the mean size N/K (a factor sqrt(max_imbalance) on each side), so
    k-means keeps as much freedom to grow a cluster as to shrink one. When no integer sizes can meet the
    bound (e.g. max_imbalance=1 and K does not divide N) the tightest split, ceil(N/K)/floor(N/K), is used.
    """
    mean = n / k
    lo = max(1, min(math.floor(mean), math.ceil(mean / math.sqrt(max_imbalance))))
    hi = max(math.ceil(mean), math.floor(lo * max_imbalance))
    return lo, hi


def rebalance(sqdist: np.ndarray, assign: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Move the cheapest points until every cluster size lies in [lo, hi].

    `sqdist[i, k]` is the squared distance of point i to centroid k; moving i from a to b costs
    sqdist[i, b] - sqdist[i, a]. Phase 1 drains clusters above `hi` into clusters with room (below `hi`),
    phase 2 fills clusters below `lo` from clusters that can spare a point (above `lo`). Each round every
    movable point proposes its cheapest allowed target and proposals are applied cheapest first while
    they stay allowed, so each round makes progress. Phase 1 never overfills a target and phase 2 only
    shrinks donors down to `lo`, so both end with sizes in [lo, hi] whenever lo*K <= N <= hi*K.
    """
    k = sqdist.shape[1]
    assign = assign.astype(np.int64).copy()
    counts = np.bincount(assign, minlength=k)

    def drain(too_big, can_take) -> None:
        while True:
            src = np.flatnonzero(too_big(counts[assign]))           # [M] points allowed to leave
            dst = can_take(counts)                                   # [K] clusters allowed to receive
            if src.size == 0 or not dst.any():
                return
            cost = sqdist[src] - sqdist[src, assign[src]][:, None]  # [M, K] distance increase
            cost[:, ~dst] = np.inf
            best = cost.argmin(axis=1)                               # [M]
            for j in np.argsort(cost[np.arange(src.size), best], kind="stable"):
                i, t = src[j], best[j]
                if too_big(counts[assign[i]]) and can_take(counts[t]):
                    counts[assign[i]] -= 1
                    counts[t] += 1
                    assign[i] = t

    drain(lambda c: c > hi, lambda c: c < hi)                        # phase 1: nobody above hi
    drain(lambda c: c > lo, lambda c: c < lo)                        # phase 2: nobody below lo
    return assign


def kmeans_partition(emb: np.ndarray, k: int, seed: int = 0, max_imbalance: float = 2.0,
                     n_init: int = 4) -> Partition:
    """sklearn KMeans (k-means++, `n_init` restarts, seeded), then `rebalance` to max/min <= max_imbalance."""
    from sklearn.cluster import KMeans

    emb = np.asarray(emb, dtype=np.float32)
    n = emb.shape[0]
    _check_k(n, k)
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(emb)
    centers = km.cluster_centers_.astype(np.float64)
    sqdist = ((emb[:, None, :].astype(np.float64) - centers[None]) ** 2).sum(-1)  # [N, K]
    lo, hi = size_bounds(n, k, max_imbalance)
    before = np.bincount(km.labels_, minlength=k)
    assign = rebalance(sqdist, km.labels_, lo, hi)
    moved = int((assign != km.labels_).sum())
    counts = np.bincount(assign, minlength=k).tolist()
    log.info("kmeans K=%d: sizes %d..%d -> %d..%d (bounds %d..%d), %d points moved",
             k, before.min(), before.max(), min(counts), max(counts), lo, hi, moved)
    return Partition(assign=assign, centroids=_shard_means(emb, assign, k), counts=counts)


def random_partition(emb: np.ndarray, k: int, seed: int = 0) -> Partition:
    """Balanced random split (sizes differ by at most one): the ablation baseline."""
    emb = np.asarray(emb, dtype=np.float32)
    n = emb.shape[0]
    _check_k(n, k)
    perm = np.random.default_rng(seed).permutation(n)
    assign = np.empty(n, dtype=np.int64)
    assign[perm] = np.arange(n) % k
    counts = np.bincount(assign, minlength=k).tolist()
    return Partition(assign=assign, centroids=_shard_means(emb, assign, k), counts=counts)


PARTITIONERS = ("kmeans", "random")


def partition(emb: np.ndarray, cfg: DataConfig) -> Partition:
    """The partitioner named by `cfg.partitioner`, with K = `cfg.num_clusters`."""
    if cfg.partitioner == "kmeans":
        return kmeans_partition(emb, cfg.num_clusters, cfg.seed, cfg.max_imbalance)
    if cfg.partitioner == "random":
        return random_partition(emb, cfg.num_clusters, cfg.seed)
    raise DataError(f"data.partitioner={cfg.partitioner!r}: unknown; known: {', '.join(PARTITIONERS)}")


def cluster_purity(assign: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose label equals the majority label of their cluster (1.0 = pure clusters)."""
    assign = np.asarray(assign, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if assign.shape != labels.shape or assign.size == 0:
        raise DataError(f"cluster_purity: assign {assign.shape} and labels {labels.shape} must have the same "
                        "non-empty shape")
    table = np.zeros((assign.max() + 1, labels.max() + 1), dtype=np.int64)  # [K, classes]
    np.add.at(table, (assign, labels), 1)
    return float(table.max(axis=1).sum() / assign.size)


def class_counts(assign: np.ndarray, labels: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """Samples of each class in each shard, int64 [K, num_classes]."""
    table = np.zeros((k, num_classes), dtype=np.int64)
    np.add.at(table, (np.asarray(assign, dtype=np.int64), np.asarray(labels, dtype=np.int64)), 1)
    return table


def class_majority_share(counts: np.ndarray) -> float:
    """Mean over classes of max_k share of the class in shard k (counts [K, C]): 1.0 when every class lives
    in one shard. Purity says how mixed a cluster is; this says how split a class is, which is what limits
    a class-conditional top-1 router (it can reach one shard per class)."""
    per_class = counts.sum(axis=0)
    held = per_class > 0
    return float((counts.max(axis=0)[held] / per_class[held]).mean())
