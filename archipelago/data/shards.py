"""The on-store format of a prepared dataset: K safetensors shards plus `manifest.json`, written last as the
commit marker. Readers trust nothing: format version, shard presence, sha256 and tensor layout are all
checked, and every failure is one `DataError` line that names the file and says to re-run data prepare."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from archipelago import storage
from archipelago.config import DataConfig
from archipelago.data.chunks import ChunkInfo, check_sha256, read_chunked_shard, verify_chunks
from archipelago.data.latents import LatentSpace
from archipelago.errors import DataError, StorageError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_RERUN = "re-run `archipelago data prepare`"


def shard_file(k: int) -> str:
    return f"shard-{k:03d}.safetensors"


# How training reads shards, and how many workers prepare them, do not change what `data prepare` writes:
# left out of the data identity.
READ_SIDE_FIELDS = frozenset({"loader", "shuffle_buffer", "prepare_workers"})


def data_config_hash(cfg: DataConfig) -> str:
    """sha256 of the canonical JSON of the data config (stable across key order; reading-side fields out)."""
    blob = json.dumps(cfg.model_dump(mode="json", exclude=set(READ_SIDE_FIELDS)), sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int = Field(description="Shard id k = expert id.")
    file: str = Field(description="File name relative to the data URL, shard-{k:03d}.safetensors.")
    sha256: str = Field(description="sha256 of the file's bytes.")
    count: int = Field(ge=1, description="Samples in the shard.")
    chunks: list[ChunkInfo] | None = Field(
        None, description="Chunked shards: the chunk files under `file` (a folder), in order; `sha256` is then "
        "the sha256 of their sha256s. None: `file` is one safetensors file.")


class HoldoutInfo(BaseModel):
    """The held-out split: samples of the source that no shard holds (no expert, router or monolith trains
    on them); evaluation scores against it."""
    model_config = ConfigDict(extra="forbid")
    file: str = Field(description="File name relative to the data URL (holdout.safetensors).")
    sha256: str = Field(description="sha256 of the file's bytes.")
    count: int = Field(ge=1, description="Held-out samples.")
    fraction: float = Field(description="data.holdout_fraction it was drawn with (seeded by data.seed).")


class ShardManifest(BaseModel):
    """What `data prepare` produced; written last, so its presence means every shard is complete."""
    model_config = ConfigDict(extra="forbid")
    format_version: int = Field(description="Layout version of shards + manifest (FORMAT_VERSION).")
    source: str = Field(description="Where the samples came from, e.g. 'digits'.")
    num_clusters: int = Field(ge=1, description="K: number of shards.")
    num_samples: int = Field(ge=1, description="Samples over all shards.")
    counts: list[int] = Field(description="Samples per shard, [K].")
    centroids: list[list[float]] = Field(description="Mean embedding of each shard, [K, D].")
    embedder: str = Field(description="Feature space the partitioner used.")
    seed: int = Field(description="data.seed.")
    partitioner: str = Field(description="kmeans | random.")
    image_shape: list[int] = Field(description="[C, H, W] or, for video, [C, F, H, W].")
    num_classes: int = Field(ge=1, description="Classes of the labels (1: unlabelled).")
    data_config_hash: str = Field(description="sha256 of the canonical JSON of the data config.")
    data_config: dict[str, Any] = Field(description="The data config itself, for provenance.")
    shards: list[ShardInfo] = Field(description="One entry per shard, in shard id order.")
    purity: float | None = Field(None, description="Cluster purity w.r.t. the labels (None: unlabelled).")
    class_counts: list[list[int]] | None = Field(
        None, description="Samples of each class in each shard, [K][C]: p(k | y) for sample-once routing.")
    class_majority_share: float | None = Field(
        None, description="Mean over classes of the share of the class in its largest shard: 1 when every "
        "class lives in one shard (what a class-conditional top-1 router needs), 1/K for random shards.")
    holdout: HoldoutInfo | None = Field(None, description="The held-out split (None: data.holdout_fraction=0).")
    latent: LatentSpace | None = Field(
        None, description="Set when shards hold VAE latents (image_shape is then the latent shape).")
    bad_images: int = Field(0, ge=0, description="Unreadable images skipped (data.on_bad_image=skip).")


@dataclass
class ShardData:
    """One shard, as written by `write_shard`."""
    images: torch.Tensor  # float32 [n, C, H, W] (video: [n, C, F, H, W]) in [-1, 1]
    labels: torch.Tensor  # int64 [n]
    index: torch.Tensor   # int64 [n], position of each sample in the source

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------

def encode_shard(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, k: int) -> bytes:
    """safetensors bytes of one shard (deterministic: same tensors -> same bytes)."""
    from safetensors.torch import save

    if not (images.shape[0] == labels.shape[0] == index.shape[0]) or images.shape[0] == 0:
        raise DataError(f"shard {k}: images {tuple(images.shape)}, labels {tuple(labels.shape)}, "
                        f"index {tuple(index.shape)} must have the same non-zero length")
    tensors = {"images": images.detach().to(torch.float32).contiguous(),
               "labels": labels.detach().to(torch.int64).contiguous(),
               "index": index.detach().to(torch.int64).contiguous()}
    # One metadata key only: safetensors keeps metadata in a hash map, so several keys come out in a random
    # order and identical shards would get different bytes (and sha256s).
    meta = json.dumps({"format_version": FORMAT_VERSION, "id": k}, sort_keys=True)
    return save(tensors, metadata={"archipelago_shard": meta})


def write_shard(data_url: str, k: int, images: torch.Tensor, labels: torch.Tensor,
                index: torch.Tensor) -> ShardInfo:
    """Atomically write shard k under data_url; returns its manifest entry (with sha256)."""
    name = shard_file(k)
    digest = storage.write_bytes(storage.join(data_url, name), encode_shard(images, labels, index, k))
    return ShardInfo(id=k, file=name, sha256=digest, count=int(labels.shape[0]))


HOLDOUT_FILE = "holdout.safetensors"


def write_holdout(data_url: str, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                  fraction: float) -> HoldoutInfo:
    """Atomically write the held-out split (same layout as a shard, id -1); returns its manifest entry."""
    digest = storage.write_bytes(storage.join(data_url, HOLDOUT_FILE), encode_shard(images, labels, index, -1))
    return HoldoutInfo(file=HOLDOUT_FILE, sha256=digest, count=int(labels.shape[0]), fraction=fraction)


def write_manifest(data_url: str, manifest: ShardManifest) -> str:
    """Write manifest.json (call this LAST: it marks the shards as complete); returns its sha256."""
    return storage.write_json(storage.join(data_url, MANIFEST), manifest.model_dump(mode="json"))


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------

def load_manifest(data_url: str) -> ShardManifest:
    """Read and validate manifest.json; DataError (one line) if missing, foreign, or another version."""
    url = storage.join(data_url, MANIFEST)
    try:
        if not storage.exists(url):
            raise DataError(f"{url}: no manifest (the data was never prepared, or preparation did not "
                            f"finish); run `archipelago data prepare`")
        raw = storage.read_json(url)
    except StorageError as exc:
        raise DataError(f"{exc}; {_RERUN}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{url}: not an Archipelago data manifest; {_RERUN}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{url}: manifest format version {version}, this Archipelago reads {FORMAT_VERSION}; "
                        f"{_RERUN}")
    try:
        m = ShardManifest.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        raise DataError(f"{url}: field '{field}': {e['msg']}; {_RERUN}") from None
    if (len(m.shards) != m.num_clusters or len(m.counts) != m.num_clusters
            or [s.id for s in m.shards] != list(range(m.num_clusters))
            or [s.count for s in m.shards] != m.counts or sum(m.counts) != m.num_samples):
        raise DataError(f"{url}: shards/counts do not match num_clusters={m.num_clusters}; {_RERUN}")
    for s in m.shards:
        check_contained(url, f"shard {s.id}", s.file)
    if m.holdout is not None:
        check_contained(url, "held-out split", m.holdout.file)
    return m


def check_contained(manifest_url: str, what: str, name: str) -> None:
    """A file named in a manifest must lie inside the data URL: a relative path without '..', no absolute
    path, no scheme (a manifest from elsewhere must not make us read, or hash-check, any other object)."""
    parts = name.replace("\\", "/").split("/")
    if (not name or "://" in name or name.startswith(("/", "\\", "~")) or (len(name) > 1 and name[1] == ":")
            or any(p in ("", ".", "..") for p in parts)):
        raise DataError(f"{manifest_url}: {what}: file {name!r} points outside the data directory (only "
                        f"relative paths inside it are allowed: no '..', absolute path or URL scheme); "
                        f"{_RERUN}")


def _shard_bytes(data_url: str, info: ShardInfo | HoldoutInfo, verify: bool) -> bytes:
    url = storage.join(data_url, info.file)
    what = f"shard {info.id}" if isinstance(info, ShardInfo) else "the held-out split"
    try:
        if not storage.exists(url):
            raise DataError(f"{url}: {what} is missing; {_RERUN}")
        data = storage.read_bytes(url)
    except StorageError as exc:
        raise DataError(f"{exc}; {_RERUN}") from None
    if verify:
        check_sha256(storage.sha256_bytes(data), info.sha256, url, "shard")
    return data


def decode_shard(data: bytes, url: str, expected_count: int | None = None) -> ShardData:
    """Parse shard bytes; a truncated/foreign file is one DataError line naming `url`."""
    from safetensors.torch import load

    try:
        t = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError/ValueError/OSError
        raise DataError(f"{url}: not a valid safetensors shard ({type(exc).__name__}; truncated or "
                        f"corrupt); {_RERUN}") from None
    missing = {"images", "labels", "index"} - set(t)
    if missing:
        raise DataError(f"{url}: shard lacks tensors {sorted(missing)}; {_RERUN}")
    n = t["labels"].shape[0]
    if t["images"].shape[0] != n or t["index"].shape[0] != n or (expected_count not in (None, n)):
        raise DataError(f"{url}: shard holds {n} labels / {t['images'].shape[0]} images, manifest says "
                        f"{expected_count}; {_RERUN}")
    return ShardData(images=t["images"], labels=t["labels"], index=t["index"])


def read_shard(data_url: str, k: int, verify: bool = True,
               manifest: ShardManifest | None = None) -> ShardData:
    """Shard k of the prepared data at data_url (sha256-checked unless verify=False)."""
    m = manifest or load_manifest(data_url)
    if not 0 <= k < m.num_clusters:
        raise DataError(f"{data_url}: shard {k} does not exist (K={m.num_clusters})")
    info = m.shards[k]
    if info.chunks is not None:
        return read_chunked_shard(data_url, info, verify)
    return decode_shard(_shard_bytes(data_url, info, verify), storage.join(data_url, info.file), info.count)


def read_holdout(data_url: str, verify: bool = True, manifest: ShardManifest | None = None) -> ShardData | None:
    """The held-out split of the prepared data (sha256-checked), or None when it was prepared without one."""
    m = manifest or load_manifest(data_url)
    if m.holdout is None:
        return None
    return decode_shard(_shard_bytes(data_url, m.holdout, verify), storage.join(data_url, m.holdout.file),
                        m.holdout.count)


def verify_shards(data_url: str, manifest: ShardManifest | None = None) -> ShardManifest:
    """Check that every shard (and the held-out split) exists, matches its sha256 and parses; returns the
    manifest."""
    m = manifest or load_manifest(data_url)
    for info in m.shards:
        if info.chunks is not None:
            verify_chunks(data_url, info)
            continue
        decode_shard(_shard_bytes(data_url, info, verify=True), storage.join(data_url, info.file), info.count)
    read_holdout(data_url, manifest=m)
    return m


def read_all(data_url: str, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, cluster_ids) over all shards in shard order, for router training."""
    m = load_manifest(data_url)
    shards = [read_shard(data_url, k, verify=verify, manifest=m) for k in range(m.num_clusters)]
    images = torch.cat([s.images for s in shards])
    labels = torch.cat([s.labels for s in shards])
    cluster_ids = torch.cat([torch.full((len(s),), k, dtype=torch.int64) for k, s in enumerate(shards)])
    return images, labels, cluster_ids


def manifest_sha256(data_url: str) -> str:
    """sha256 of manifest.json's bytes (ensembles record it to pin the data they were trained on)."""
    url = storage.join(data_url, MANIFEST)
    try:
        return storage.sha256_url(url)
    except StorageError as exc:
        raise DataError(f"{exc}; run `archipelago data prepare`") from None
