"""`archipelago data prepare`: source -> embed -> partition -> K shards -> manifest.json (last).

Idempotent: a verified manifest with the same data-config hash is reused untouched; anything else is
rebuilt, and the old manifest is removed first so a half-rewritten directory never looks complete."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from archipelago import storage
from archipelago.config import DataConfig
from archipelago.data.chunks import write_chunked_shard
from archipelago.data.embedders import get_embedder
from archipelago.data.partition import class_counts, class_majority_share, cluster_purity, partition
from archipelago.data.shards import (
    FORMAT_VERSION,
    HOLDOUT_FILE,
    MANIFEST,
    ShardManifest,
    data_config_hash,
    load_manifest,
    shard_file,
    verify_shards,
    write_holdout,
    write_manifest,
    write_shard,
)
from archipelago.data.sources import load_source
from archipelago.errors import DataError

log = logging.getLogger(__name__)


def streamed_preparation(cfg: DataConfig) -> bool:
    """Whether `data prepare` reads the source lazily (archipelago.data.scale): always for WebDataset tars, and
    for image folders prepared into chunked shards or that skip bad images."""
    return cfg.source == "webdataset" or (
        cfg.source == "image_folder" and (cfg.shard_format == "chunked" or cfg.on_bad_image == "skip"))


def remove_unlisted_shards(out_url: str, keep: set[str]) -> None:
    """Remove shard files/folders (e.g. of an earlier, larger K or another format) the manifest does not list."""
    for name in storage.listdir(out_url):
        if name.startswith("shard-") and name not in keep and (
                name.endswith(".safetensors") or "." not in name):
            storage.remove(storage.join(out_url, name), recursive=True)


def _reusable(out_url: str, config_hash: str) -> ShardManifest | None:
    """The existing manifest at out_url if it was made from the same config and all shards verify."""
    if not storage.exists(storage.join(out_url, MANIFEST)):
        return None
    try:
        m = load_manifest(out_url)
        if m.data_config_hash != config_hash:
            log.info("%s: existing data was prepared from another config; rebuilding", out_url)
            return None
        return verify_shards(out_url, m)
    except DataError as exc:
        log.warning("%s: existing data is not reusable (%s); rebuilding", out_url, exc)
        return None


@contextlib.contextmanager
def _progress(columns: tuple, enabled: bool) -> Iterator[Progress]:
    """A rich progress bar on stderr that vanishes when preparation fails: the error is then the only line."""
    bar = Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False)
    with bar:
        try:
            yield bar
        except BaseException:
            bar.live.transient = True
            raise


def prepare_data(cfg: DataConfig, out_url: str, progress: bool = True) -> ShardManifest:
    """Build (or reuse) the K shards + manifest for `cfg` under `out_url`; returns the manifest."""
    config_hash = data_config_hash(cfg)
    existing = _reusable(out_url, config_hash)
    if existing is not None:
        log.info("%s: reusing prepared data (config %s…)", out_url, config_hash[:12])
        return existing

    if streamed_preparation(cfg):   # large or remote sources: read lazily, never all in memory
        from archipelago.data.scale import prepare_streamed

        return prepare_streamed(cfg, out_url, config_hash, progress=progress)

    # --- fail fast: the embedder validates its setup (dinov2 weights) and the VAE loads before any data is read
    embedder = get_embedder(cfg.embedder, cfg)
    codec = None
    if cfg.vae is not None:
        from archipelago.data.latents import VaeCodec

        codec = VaeCodec(cfg.vae)
    k = cfg.num_clusters
    columns = (TextColumn("[bold]data prepare[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with _progress(columns, progress) as bar:
        task = bar.add_task("load source", total=3 + k)

        # --- source, and the held-out split (seeded; never embedded, clustered or sharded) ---
        src = load_source(cfg)
        train, held = holdout_split(len(src), cfg.holdout_fraction, cfg.seed)
        n = len(train)
        if k > n:
            raise DataError(f"data.num_clusters={k} is larger than the number of training samples ({n}) in "
                            f"source {src.name!r}; lower data.num_clusters (or data.holdout_fraction)")
        images, labels_t = src.images[train], src.labels[train]
        bar.update(task, advance=1, description=f"embed {n} samples ({embedder.name})")

        # --- embed (training samples only: the held-out split must not shape the clusters) ---
        if getattr(embedder, "needs_labels", False):
            emb = embedder.embed(images, labels=labels_t, num_classes=src.num_classes)  # [N, D]
        else:
            emb = embedder.embed(images)  # [N, D]
        if emb.shape[0] != n or not np.isfinite(emb).all():
            raise DataError(f"embedder {embedder.name!r} returned features {emb.shape} (or non-finite "
                            f"values) for {n} samples")
        bar.update(task, advance=1, description=f"partition into K={k} ({cfg.partitioner})")

        # --- latents: shards hold what the experts learn; the partition above used the pixels ---
        stored, held_stored, latent = images, src.images[held], None
        if codec is not None:
            stored = codec.encode(images)                       # [N, c, h, w]
            latent = codec.space(list(stored.shape[1:]), list(src.images.shape[1:]))
            if len(held):                                       # the same space as the shards
                held_stored = codec.encode(held_stored)

        # --- partition ---
        part = partition(emb, cfg)
        labels = labels_t.numpy()
        purity = cluster_purity(part.assign, labels) if src.num_classes > 1 else None
        table = class_counts(part.assign, labels, k, src.num_classes)
        bar.update(task, advance=1, description="write shards")

        # --- shards, then the manifest (the commit marker) ---
        storage.remove(storage.join(out_url, MANIFEST))  # a stale manifest must never bless new shards
        infos = []
        for s in range(k):
            idx = torch.from_numpy(np.flatnonzero(part.assign == s)).to(torch.int64)  # training positions
            if cfg.shard_format == "chunked":
                infos.append(write_chunked_shard(out_url, s, stored[idx], labels_t[idx], train[idx],
                                                 int(cfg.chunk_mb * 2**20)))
            else:
                infos.append(write_shard(out_url, s, stored[idx], labels_t[idx], train[idx]))
            bar.update(task, advance=1, description=f"write {shard_file(s)}")
        holdout = None
        if len(held):
            holdout = write_holdout(out_url, held_stored, src.labels[held], held, cfg.holdout_fraction)
        else:
            storage.remove(storage.join(out_url, HOLDOUT_FILE))
        manifest = ShardManifest(
            format_version=FORMAT_VERSION, source=src.name, num_clusters=k, num_samples=n,
            counts=part.counts, centroids=part.centroids.astype(float).tolist(), embedder=embedder.name,
            seed=cfg.seed, partitioner=cfg.partitioner, image_shape=list(stored.shape[1:]),
            num_classes=src.num_classes, data_config_hash=config_hash,
            data_config=cfg.model_dump(mode="json"), shards=infos, purity=purity, latent=latent,
            class_counts=table.tolist(), class_majority_share=class_majority_share(table), holdout=holdout)
        write_manifest(out_url, manifest)
        bar.update(task, description="done")

    # Shards left over from an earlier, larger K are not in the manifest; remove them so the folder is clean.
    remove_unlisted_shards(out_url, {i.file for i in infos})
    log.info("%s: %d samples -> K=%d shards %s (imbalance %.2f, purity %s, held out %d)", out_url, n, k,
             part.counts, part.imbalance, "n/a" if purity is None else f"{purity:.3f}", len(held))
    return manifest


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training positions, held-out positions), each sorted: a seeded permutation of the n source samples,
    round(fraction * n) of it held out. A function of (n, fraction, seed) only, so every K, embedder and
    partitioner of one source holds out the same samples and their scores are comparable."""
    n_held = round(fraction * n)
    if 0 < n_held < 2 or n - n_held < 1:
        log.warning("data.holdout_fraction=%s of %d samples would hold out %d: too few to score against; "
                    "no held-out split", fraction, n, n_held)
        n_held = 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    return perm[n_held:].sort().values, perm[:n_held].sort().values
