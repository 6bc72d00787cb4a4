"""`data prepare` for sources that do not fit in memory: image folders and WebDataset tars on any fsspec store
(S3 included), read lazily, encoded and embedded batch by batch, clustered with MiniBatchKMeans, written as
chunked shards. Memory is bounded by a batch, a chunk and O(N*K) numbers for the balanced assignment.

Passes (every one streams; `prepare_batch` records per step):
  1. read -> decode (bad images: skip or fail) -> VAE encode -> pretrained embedding -> a staged part
     `.staging/part-NNNNNN.safetensors` (atomic; the unit of resumption: a killed run redoes at most one part,
     or the parts in flight with `prepare_workers` > 1, where Ray actors build parts of an image folder)
  2. pixel_pca only: streaming mean/std, then IncrementalPCA on at most `kmeans_fit_samples` rows
  3. MiniBatchKMeans fitted on the first `kmeans_fit_samples` embeddings (seeded, fixed order)
  4. assignment: squared distances [N, K] part by part, then our balance constraint (`rebalance`)
  5. shard k <- the rows of every part assigned to k, through a ChunkWriter (or one file, shard_format=single)
Everything is seeded and ordered, so a resumed run writes the same manifest as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from archipelago import storage
from archipelago.config import DataConfig
from archipelago.errors import DataError, StorageError

log = logging.getLogger(__name__)

STAGING = ".staging"
STATE = "state.json"
_FIT_BATCH = 2048


@dataclass
class Record:
    """One sample before decoding: where it came from (for error lines), its bytes, its class id."""
    name: str
    data: bytes | None   # None: the bytes could not be read (a bad image, like an undecodable one)
    label: int


# ----------------------------------------------------------------------------------------------------
# Sources, read lazily
# ----------------------------------------------------------------------------------------------------

class ImageFolderRecords:
    """Every image under a folder/glob URL; class = parent folder (sorted names), read a batch at a time."""

    def __init__(self, url: str):
        from archipelago.data.sources import IMAGE_EXTENSIONS, list_images

        self.url = url
        self.fs, self.files = list_images(url)
        if not self.files:
            raise DataError(f"{url}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}); check data.path")
        parents = [PurePosixPath(f).parent.as_posix() for f in self.files]
        classes = sorted(set(parents))
        ids = {c: i for i, c in enumerate(classes)}
        self.labels = [ids[p] for p in parents] if len(classes) > 1 else [0] * len(self.files)
        self.num_classes = max(1, len(classes)) if len(classes) > 1 else 1
        self.name = f"image_folder:{storage.redact(url)}"

    @property
    def total(self) -> int | None:
        return len(self.files)

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.files).encode()).hexdigest()

    def batches(self, start: int, size: int) -> Iterator[list[Record]]:
        """Records [start:] in batches of `size`; each batch is fetched concurrently (fs.cat on S3)."""
        for i in range(start, len(self.files), size):
            names = self.files[i:i + size]
            try:
                got = self.fs.cat(names, on_error="return")
            except Exception as exc:  # noqa: BLE001 - backends raise anything; map to one line
                raise DataError(storage.redact(f"{names[0]}: cannot read ({type(exc).__name__}: {exc})")) from None
            if not isinstance(got, dict):
                got = {names[0]: got}
            yield [Record(n, got.get(n) if isinstance(got.get(n), bytes) else None, self.labels[i + j])
                   for j, n in enumerate(names)]


class WebDatasetRecords:
    """Samples of WebDataset tar shards (`key.png` + optional `key.cls`), each tar streamed once in order."""

    def __init__(self, url: str):
        fs, path = storage.filesystem(url)
        try:
            if any(ch in path for ch in "*?["):
                found = fs.glob(path)
            elif fs.isdir(path):
                found = fs.find(path)
            else:
                found = [path] if fs.exists(path) else []
        except Exception as exc:  # noqa: BLE001
            raise DataError(storage.redact(f"{url}: cannot list tar files ({type(exc).__name__}: {exc})")) from None
        self.fs, self.url = fs, url
        self.tars = sorted(str(p) for p in found if str(p).endswith(".tar"))
        if not self.tars:
            raise DataError(f"{url}: no .tar files found; check data.path (WebDataset shards)")
        self.name = f"webdataset:{storage.redact(url)}"
        self.num_classes = 0   # known after pass 1 (max .cls + 1)

    @property
    def total(self) -> int | None:
        return None   # unknown until the tars are read

    def fingerprint(self) -> str:
        sizes = [str(self.fs.size(t)) for t in self.tars]
        return hashlib.sha256("\n".join(f"{t} {s}" for t, s in zip(self.tars, sizes)).encode()).hexdigest()

    def _samples(self) -> Iterator[Record]:
        from archipelago.data.sources import IMAGE_EXTENSIONS

        for tar_path in self.tars:
            try:
                with self.fs.open(tar_path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tf:
                    key, image, label, name = None, None, 0, ""
                    for member in tf:                      # stream: members arrive grouped by key
                        if not member.isfile():
                            continue
                        base = member.name.rsplit("/", 1)[-1]
                        stem, _, ext = base.partition(".")
                        k = member.name[: len(member.name) - len(base)] + stem
                        if k != key and key is not None and name:
                            yield Record(name, image, label)
                        if k != key:
                            key, image, label, name = k, None, 0, ""
                        data = tf.extractfile(member).read()  # type: ignore[union-attr]
                        if ("." + ext.lower()).endswith(IMAGE_EXTENSIONS) and not name:
                            image, name = data, f"{tar_path}#{member.name}"
                        elif ext in ("cls", "label"):
                            try:
                                label = int(data.decode().strip())
                            except ValueError:
                                raise DataError(f"{tar_path}#{member.name}: class label is not an integer "
                                                f"({data[:20]!r})") from None
                    if key is not None and name:
                        yield Record(name, image, label)
            except (tarfile.TarError, EOFError) as exc:
                raise DataError(f"{tar_path}: not a readable tar ({type(exc).__name__}: {exc})") from None
            except (StorageError, DataError):
                raise
            except OSError as exc:
                raise DataError(storage.redact(f"{tar_path}: cannot read ({type(exc).__name__}: {exc})")) from None

    def batches(self, start: int, size: int) -> Iterator[list[Record]]:
        batch: list[Record] = []
        for i, rec in enumerate(self._samples()):
            if i < start:
                continue
            batch.append(rec)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch


def open_records(cfg: DataConfig) -> ImageFolderRecords | WebDatasetRecords:
    if not cfg.path:
        raise DataError(f"data.path is required when data.source={cfg.source} (a folder or glob URL)")
    try:
        return ImageFolderRecords(cfg.path) if cfg.source == "image_folder" else WebDatasetRecords(cfg.path)
    except StorageError as exc:
        raise DataError(str(exc)) from None


def decode_image(raw: bytes | None, name: str, size: int) -> np.ndarray | None:
    """RGB [3, size, size] float32 in [-1, 1] (centre square crop, bicubic resize), or None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    if raw is None:
        return None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            im = img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return (np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0


# ----------------------------------------------------------------------------------------------------
# Pass 1: staged parts
# ----------------------------------------------------------------------------------------------------

def _part_url(staging: str, i: int) -> str:
    return storage.join(staging, f"part-{i:06d}.safetensors")


def _encode_part(x: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, emb: torch.Tensor | None,
                 records: int, bad: int) -> bytes:
    from safetensors.torch import save

    t = {"x": x.contiguous(), "labels": labels.contiguous(), "index": index.contiguous()}
    if emb is not None:
        t["emb"] = emb.contiguous()
    return save(t, metadata={"archipelago_part": json.dumps({"records": records, "bad": bad})})


def _read_part(url: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    from safetensors.torch import load

    data = storage.read_bytes(url)
    try:
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len])["__metadata__"]["archipelago_part"]
        return load(data), json.loads(meta)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign part: the caller re-stages it
        raise DataError(f"{url}: not a valid staged part ({type(exc).__name__})") from None


def build_part(cfg: DataConfig, i: int, batch: list[Record], embed: Callable[[torch.Tensor], np.ndarray] | None,
               codec: Any) -> bytes:
    """Staged part i from its records: decode (bad images skipped or failed), VAE-encode, embed."""
    b = cfg.prepare_batch
    arrays, labels, index, bad = [], [], [], 0
    for off, rec in enumerate(batch):
        a = decode_image(rec.data, rec.name, cfg.image_size)
        if a is None:
            if cfg.on_bad_image == "fail":
                raise DataError(f"{storage.redact(rec.name)}: not a readable image; remove it or set "
                                "data.on_bad_image=skip")
            bad += 1
            log.warning("skipping unreadable image %s", storage.redact(rec.name))
            continue
        arrays.append(a)
        labels.append(rec.label)
        index.append(i * b + off)
    if arrays:
        pixels = torch.from_numpy(np.stack(arrays))                          # [n, 3, S, S] in [-1, 1]
        stored = codec.encode(pixels) if codec is not None else pixels       # [n, c, h, w]
        emb = torch.from_numpy(np.asarray(embed(pixels), dtype=np.float32)) if embed is not None else None
    else:
        stored, emb = torch.zeros(0), None
    return _encode_part(stored.float(), torch.tensor(labels, dtype=torch.int64),
                        torch.tensor(index, dtype=torch.int64), emb, len(batch), bad)


def _staged(url: str) -> dict[str, int] | None:
    """meta of a complete staged part, None if absent or torn (then it is built again)."""
    try:
        return _read_part(url)[1] if storage.exists(url) else None
    except (DataError, StorageError):
        return None


def stage_parts(cfg: DataConfig, records: ImageFolderRecords | WebDatasetRecords, staging: str,
                embed: Callable[[torch.Tensor], np.ndarray] | None, codec: Any,
                advance: Callable[[int], None]) -> list[str]:
    """Pass 1, in this process; reuses every part a killed run finished (so it redoes at most the parts that
    were being written when it died: one here, `prepare_workers` in parallel)."""
    b = cfg.prepare_batch
    urls: list[str] = []
    done = 0
    while (meta := _staged(_part_url(staging, done))) is not None:
        urls.append(_part_url(staging, done))
        done += 1
        advance(meta["records"])
    if done:
        log.info("%s: resuming after %d staged parts", staging, done)
    for j, batch in enumerate(records.batches(done * b, b)):
        url = _part_url(staging, done + j)
        if _staged(url) is None:        # parallel runs may leave later parts done and earlier ones not
            storage.write_bytes(url, build_part(cfg, done + j, batch, embed, codec))
        urls.append(url)
        advance(len(batch))
    return urls


def stage_parts_parallel(cfg: DataConfig, records: ImageFolderRecords, staging: str,
                         advance: Callable[[int], None]) -> list[str]:
    """Pass 1 as Ray actors (image folders): `prepare_workers` actors each load the VAE and embedder once and
    build the parts they are handed (reading their images themselves, so bytes never pass the driver)."""
    import ray

    from archipelago.cluster.local import connect_ray

    b = cfg.prepare_batch
    n_parts = -(-len(records.files) // b)
    urls = [_part_url(staging, i) for i in range(n_parts)]
    todo = []
    for i, url in enumerate(urls):
        meta = _staged(url)
        if meta is None:
            todo.append(i)
        else:
            advance(meta["records"])
    if not todo:
        return urls
    started = connect_ray(hint="set RAY_ADDRESS or data.prepare_workers=1", include_dashboard=False,
                          log_to_driver=False)
    try:
        builder = ray.remote(num_cpus=1)(_PartBuilder)
        actors = [builder.remote(cfg.model_dump(mode="json"), staging) for _ in range(min(cfg.prepare_workers,
                                                                                           len(todo)))]
        pending: dict[Any, int] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < 2 * len(actors):   # two parts in flight per actor
                i = queue.pop(0)
                sl = slice(i * b, (i + 1) * b)
                pending[actors[i % len(actors)].build.remote(i, records.files[sl], records.labels[sl])] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            pending.pop(ready[0])
            try:
                advance(ray.get(ready[0]))
            except ray.exceptions.RayTaskError as exc:
                from archipelago.errors import failure_line

                raise DataError(failure_line(exc)) from None
    finally:
        if started:
            ray.shutdown()
    return urls


class _PartBuilder:
    """A Ray actor holding the VAE and the embedder; builds and writes staged parts of an image folder."""

    def __init__(self, data_cfg: dict[str, Any], staging: str):
        import logging

        logging.basicConfig(level=logging.WARNING)
        self.cfg = DataConfig.model_validate(data_cfg)
        torch.set_num_threads(1)
        self.embed = _embed_fn(self.cfg)[1]
        self.codec = None
        if self.cfg.vae is not None:
            from archipelago.data.latents import VaeCodec

            self.codec = VaeCodec(self.cfg.vae)
        self.staging = staging
        self.fs = storage.filesystem(self.cfg.path or "")[0]

    def build(self, i: int, names: list[str], labels: list[int]) -> int:
        got = self.fs.cat(names, on_error="return")
        got = got if isinstance(got, dict) else {names[0]: got}
        batch = [Record(n, got.get(n) if isinstance(got.get(n), bytes) else None, lab)
                 for n, lab in zip(names, labels)]
        storage.write_bytes(_part_url(self.staging, i), build_part(self.cfg, i, batch, self.embed, self.codec))
        return len(names)


# ----------------------------------------------------------------------------------------------------
# Passes 2-4: features, MiniBatchKMeans, balanced assignment
# ----------------------------------------------------------------------------------------------------

class _Features:
    """Embeddings of a part: the staged pretrained ones, or a streaming-fitted standardize + PCA of the
    stored tensors (pixel_pca at scale: fit on at most `fit_samples` rows, two streaming passes)."""

    def __init__(self, parts: list[str], pretrained: bool, dim: int, fit_samples: int, seed: int):
        self.pca = None
        if pretrained:
            return
        from sklearn.decomposition import IncrementalPCA

        total, s1, s2 = 0, None, None
        for url in self._fit_parts(parts, fit_samples):
            x = _read_part(url)[0]["x"].flatten(1).double()
            if x.shape[0]:
                s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
                s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
                total += x.shape[0]
        self.mean = (s1 / total).numpy()
        self.std = ((s2 / total - (s1 / total) ** 2).clamp(min=0).sqrt()).numpy()
        self.std[self.std < 1e-8] = 1.0
        n_comp = min(dim, total, self.mean.shape[0])
        self.pca = IncrementalPCA(n_components=n_comp)
        buf: list[np.ndarray] = []
        rows = 0
        for url in self._fit_parts(parts, fit_samples):
            x = self._standard(_read_part(url)[0]["x"])
            if x.shape[0]:
                buf.append(x)
                rows += x.shape[0]
            if rows >= max(n_comp, _FIT_BATCH):
                self.pca.partial_fit(np.concatenate(buf))
                buf, rows = [], 0
        if rows >= n_comp or not hasattr(self.pca, "components_"):
            self.pca.partial_fit(np.concatenate(buf))

    @staticmethod
    def _fit_parts(parts: list[str], fit_samples: int) -> Iterator[str]:
        seen = 0
        for url in parts:
            if seen >= fit_samples:
                return
            yield url
            seen += int(_read_part(url)[1]["records"])

    def dim(self, f: np.ndarray) -> int:
        return int(f.shape[1])

    def _standard(self, x: torch.Tensor) -> np.ndarray:
        return (x.flatten(1).double().numpy() - self.mean) / self.std

    def __call__(self, part: dict[str, torch.Tensor]) -> np.ndarray:
        if self.pca is None:
            return part["emb"].numpy() if "emb" in part else np.zeros((0, 1), np.float32)
        x = part["x"]
        if not x.shape[0]:
            return np.zeros((0, self.pca.n_components_), np.float32)
        return self.pca.transform(self._standard(x)).astype(np.float32)


def cluster_streamed(parts: list[str], features: _Features, cfg: DataConfig, keep: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(assign [N], centroids [K, D] = member means, labels [N]) with MiniBatchKMeans + `rebalance`.
    Samples outside `keep` (the held-out split) shape nothing and get shard -1."""
    from sklearn.cluster import MiniBatchKMeans

    from archipelago.data.partition import rebalance, size_bounds

    k = cfg.num_clusters
    n, n_train = keep.shape[0], int(keep.sum())
    # Pass 3: fit on the first `kmeans_fit_samples` embeddings, a sample whose size does not grow with N
    # (partial_fit alone would make one mini-batch step per call, too few on small data). Every array that
    # lives across parts is allocated once up front: small long-lived pieces between the parts' transient
    # buffers would pin the heap and make RSS grow with the number of parts.
    fit: np.ndarray | None = None
    seen = pos = 0
    for url in parts:
        if seen >= min(cfg.kmeans_fit_samples, n_train):
            break
        f = features(_read_part(url)[0])
        f, pos = f[keep[pos:pos + f.shape[0]]][: cfg.kmeans_fit_samples - seen], pos + f.shape[0]
        if not f.shape[0]:
            continue
        if fit is None:
            fit = np.empty((min(cfg.kmeans_fit_samples, n_train), features.dim(f)), np.float32)
        fit[seen:seen + f.shape[0]] = f
        seen += f.shape[0]
    assert fit is not None
    km = MiniBatchKMeans(n_clusters=k, random_state=cfg.seed, batch_size=_FIT_BATCH, n_init=3)
    km.fit(fit[:seen])
    del fit
    centers = km.cluster_centers_.astype(np.float64)

    d = np.empty((n, k), np.float32)                        # pass 4: distances for the balanced assignment
    labels = np.empty(n, np.int64)
    pos = 0
    for url in parts:
        part = _read_part(url)[0]
        f = features(part).astype(np.float64)
        m = f.shape[0]
        if m:
            d[pos:pos + m] = ((f[:, None, :] - centers[None]) ** 2).sum(-1)   # [m, K]
            labels[pos:pos + m] = part["labels"].numpy()
            pos += m
    lo, hi = size_bounds(n_train, k, cfg.max_imbalance)
    assign = np.full(n, -1, np.int64)
    d = d[keep]
    assign[keep] = rebalance(d, d.argmin(1), lo, hi)
    return assign, member_means(parts, features, assign, k), labels


def member_means(parts: list[str], features: _Features, assign: np.ndarray, k: int) -> np.ndarray:
    """Mean embedding of each shard's members (what the manifest records as centroids), one more pass;
    samples assigned -1 (held out) are skipped."""
    sums: np.ndarray | None = None
    pos = 0
    for url in parts:
        f = features(_read_part(url)[0]).astype(np.float64)
        if not f.shape[0]:
            continue
        a, pos = assign[pos:pos + f.shape[0]], pos + f.shape[0]
        sums = np.zeros((k, f.shape[1])) if sums is None else sums
        np.add.at(sums, a[a >= 0], f[a >= 0])
    assert sums is not None
    return (sums / np.bincount(assign[assign >= 0], minlength=k).clip(min=1)[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# The whole streamed preparation
# ----------------------------------------------------------------------------------------------------

def _embed_fn(cfg: DataConfig) -> tuple[str, Callable[[torch.Tensor], np.ndarray] | None]:
    """(embedder name, per-batch embedding of pixels) — None for pixel_pca, which is fitted after pass 1."""
    if cfg.embedder == "pixel_pca":
        return "pixel_pca", None
    from archipelago.data.embedders import get_embedder

    emb = get_embedder(cfg.embedder, cfg)
    return emb.name, emb.embed


def prepare_streamed(cfg: DataConfig, out_url: str, config_hash: str, progress: bool = True):
    """Build the K shards + manifest for a lazily read source (see the module docstring)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from archipelago.data.chunks import ChunkWriter
    from archipelago.data.partition import class_counts, class_majority_share, cluster_purity
    from archipelago.data.prepare import _progress, holdout_split, remove_unlisted_shards
    from archipelago.data.shards import (
        FORMAT_VERSION,
        HOLDOUT_FILE,
        MANIFEST,
        ShardManifest,
        write_holdout,
        write_manifest,
        write_shard,
    )

    # --- fail fast: embedder weights, VAE, source listing -------------------------------------------
    emb_name, embed = _embed_fn(cfg)
    codec = None
    if cfg.vae is not None:
        from archipelago.data.latents import VaeCodec

        codec = VaeCodec(cfg.vae)
    records = open_records(cfg)
    staging = storage.join(out_url, STAGING)
    state = {"data_config_hash": config_hash, "source": records.fingerprint(),
             "vae": codec.sha256 if codec else None}
    state_url = storage.join(staging, STATE)
    if not storage.exists(state_url) or storage.read_json(state_url) != state:
        storage.remove(staging, recursive=True)             # another config or source: nothing to resume
        storage.write_json(state_url, state)
    storage.remove(storage.join(out_url, MANIFEST))         # a stale manifest must never bless new shards

    columns = (TextColumn("[bold]data prepare[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with _progress(columns, progress) as bar:
        task = bar.add_task(f"read + encode + embed ({emb_name})", total=records.total)
        advance = lambda m: bar.update(task, advance=m)
        if cfg.prepare_workers > 1 and isinstance(records, ImageFolderRecords):
            parts = stage_parts_parallel(cfg, records, staging, advance)
        else:
            parts = stage_parts(cfg, records, staging, embed, codec, advance)

        # --- counts over the staged parts ---
        n = bad = max_label = 0
        shape: list[int] | None = None
        for url in parts:
            t, meta = _read_part(url)
            bad += meta["bad"]
            if t["labels"].shape[0]:
                n += t["labels"].shape[0]
                max_label = max(max_label, int(t["labels"].max()))
                shape = list(t["x"].shape[1:])
        k = cfg.num_clusters
        if n == 0 or shape is None:
            raise DataError(f"{records.name}: no readable images ({bad} unreadable skipped)")
        # The held-out split: seeded positions in the staged order (a function of the readable sample count),
        # never clustered or sharded; they get shard -1 below.
        held = holdout_split(n, cfg.holdout_fraction, cfg.seed)[1].numpy()
        keep = np.ones(n, dtype=bool)
        keep[held] = False
        n_train = int(keep.sum())
        if k > n_train:
            raise DataError(f"data.num_clusters={k} is larger than the number of training samples ({n_train}) "
                            f"in source {records.name!r}; lower data.num_clusters (or data.holdout_fraction)")
        num_classes = records.num_classes or max_label + 1

        # --- passes 2-4 ---
        bar.update(task, description=f"cluster {n_train} samples (MiniBatchKMeans K={k})")
        features = _Features(parts, embed is not None, cfg.embed_dim, cfg.kmeans_fit_samples, cfg.seed)
        if cfg.partitioner == "random":
            perm = np.random.default_rng(cfg.seed).permutation(n_train)
            assign = np.full(n, -1, dtype=np.int64)
            assign[np.flatnonzero(keep)[perm]] = np.arange(n_train) % k
            labels = np.concatenate([_read_part(u)[0]["labels"].numpy() for u in parts])
            centroids = member_means(parts, features, assign, k)
        else:
            assign, centroids, labels = cluster_streamed(parts, features, cfg, keep)
        counts = np.bincount(assign[keep], minlength=k).tolist()
        purity = cluster_purity(assign[keep], labels[keep]) if num_classes > 1 else None
        table = class_counts(assign[keep], labels[keep], k, num_classes)

        # --- pass 5: shards, one at a time (memory: one part + one chunk) ---
        infos = []
        chunk_bytes = int(cfg.chunk_mb * 2**20)
        for s in range(k):
            bar.update(task, description=f"write shard {s}")
            writer = ChunkWriter(out_url, s, chunk_bytes) if cfg.shard_format == "chunked" else None
            whole: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
            pos = 0
            for url in parts:
                t = _read_part(url)[0]
                m = t["labels"].shape[0]
                sel = torch.from_numpy(np.flatnonzero(assign[pos:pos + m] == s))
                pos += m
                if sel.numel():
                    rows = (t["x"][sel], t["labels"][sel], t["index"][sel])
                    if writer is not None:
                        writer.add(*rows)
                    else:
                        whole.append(rows)
            if writer is not None:
                infos.append(writer.finish())
            else:
                infos.append(write_shard(out_url, s, *(torch.cat([w[j] for w in whole]) for j in range(3))))
        # The held-out split is one file (evaluation reads it whole): its memory is holdout_fraction x data.
        holdout = None
        if len(held):
            bar.update(task, description=f"write the held-out split ({len(held)})")
            rows, pos = [], 0
            for url in parts:
                t = _read_part(url)[0]
                m = t["labels"].shape[0]
                sel = torch.from_numpy(np.flatnonzero(~keep[pos:pos + m]))
                pos += m
                if sel.numel():
                    rows.append((t["x"][sel], t["labels"][sel], t["index"][sel]))
            holdout = write_holdout(out_url, *(torch.cat([r[j] for r in rows]) for j in range(3)),
                                    cfg.holdout_fraction)
            del rows
        else:
            storage.remove(storage.join(out_url, HOLDOUT_FILE))
        manifest = ShardManifest(
            format_version=FORMAT_VERSION, source=records.name, num_clusters=k, num_samples=n_train, counts=counts,
            centroids=centroids.astype(float).tolist(), embedder=emb_name, seed=cfg.seed,
            partitioner=cfg.partitioner, image_shape=shape, num_classes=num_classes, data_config_hash=config_hash,
            data_config=cfg.model_dump(mode="json"), shards=infos, purity=purity,
            latent=codec.space(shape, [3, cfg.image_size, cfg.image_size]) if codec else None, bad_images=bad,
            class_counts=table.tolist(), class_majority_share=class_majority_share(table), holdout=holdout)
        write_manifest(out_url, manifest)
        bar.update(task, description="done")
    remove_unlisted_shards(out_url, {i.file for i in infos})
    storage.remove(staging, recursive=True)
    log.info("%s: %d samples (%d unreadable skipped) -> K=%d shards %s (purity %s, held out %d)", out_url,
             n_train, bad, k, counts, "n/a" if purity is None else f"{purity:.3f}", len(held))
    return manifest
