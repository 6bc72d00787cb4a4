"""Chunked shards: a shard as a list of bounded safetensors files, and a stream that trains from them.

Single-file shards are loaded whole, so an island's memory grows with its shard. A chunked shard is a folder
`shard-{k:03d}/` of `chunk-{i:05d}.safetensors` files of at most `data.chunk_mb` each, every one listed with
its sha256 in the manifest; `ChunkStream` reads them one at a time from any fsspec store (S3 included), with
the next chunk prefetched on a thread, through a shuffle buffer, so memory is bounded by the buffer plus two
chunks whatever the shard's size. Why not Ray Data: see README "Bring your own data" (measured).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from archipelago import storage
from archipelago.errors import DataError, StorageError

if TYPE_CHECKING:  # shards.py imports this module: no runtime import back
    from archipelago.data.shards import ShardData, ShardInfo

CHUNK_FORMAT_VERSION = 1
_RERUN = "re-run `archipelago data prepare`"
_CHUNK_NAME = re.compile(r"^chunk-\d{5}\.safetensors$")
_SHARD_DIR = re.compile(r"^shard-\d{3}$")


class ChunkInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = Field(description="File name inside the shard folder, chunk-{i:05d}.safetensors.")
    sha256: str = Field(description="sha256 of the file's bytes.")
    count: int = Field(ge=1, description="Samples in the chunk.")


def shard_dir(k: int) -> str:
    return f"shard-{k:03d}"


def chunk_file(i: int) -> str:
    return f"chunk-{i:05d}.safetensors"


def chunks_digest(chunks: list[ChunkInfo]) -> str:
    """The shard-level sha256 of a chunked shard: sha256 of its chunks' sha256s, in order."""
    return hashlib.sha256(json.dumps([c.sha256 for c in chunks]).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------

def encode_chunk(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, shard: int, i: int) -> bytes:
    """safetensors bytes of one chunk (deterministic: same tensors -> same bytes)."""
    from safetensors.torch import save

    tensors = {"images": images.detach().to(torch.float32).contiguous(),
               "labels": labels.detach().to(torch.int64).contiguous(),
               "index": index.detach().to(torch.int64).contiguous()}
    meta = json.dumps({"format_version": CHUNK_FORMAT_VERSION, "shard": shard, "chunk": i}, sort_keys=True)
    return save(tensors, metadata={"archipelago_chunk": meta})


class ChunkWriter:
    """Appends rows of one shard and writes a chunk (atomically) whenever `chunk_bytes` worth is buffered."""

    def __init__(self, data_url: str, shard: int, chunk_bytes: int):
        self.data_url, self.shard, self.chunk_bytes = data_url, shard, max(1, int(chunk_bytes))
        self.chunks: list[ChunkInfo] = []
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._rows = 0
        self._row_bytes = 0

    def add(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        if images.shape[0] == 0:
            return
        self._row_bytes = images[0].numel() * 4 + 16          # float32 sample + label + index
        per_chunk = max(1, self.chunk_bytes // self._row_bytes)
        self._parts.append((images, labels, index))
        self._rows += images.shape[0]
        while self._rows >= per_chunk:
            self._flush(per_chunk)

    def _flush(self, rows: int) -> None:
        x, y, idx = (torch.cat([p[j] for p in self._parts]) for j in range(3))
        i = len(self.chunks)
        name = chunk_file(i)
        url = storage.join(self.data_url, shard_dir(self.shard), name)
        digest = storage.write_bytes(url, encode_chunk(x[:rows], y[:rows], idx[:rows], self.shard, i))
        self.chunks.append(ChunkInfo(file=name, sha256=digest, count=rows))
        rest = (x[rows:], y[rows:], idx[rows:])
        self._parts = [rest] if rest[0].shape[0] else []
        self._rows = int(rest[0].shape[0])

    def finish(self) -> ShardInfo:
        """Write the last partial chunk; the shard's manifest entry."""
        from archipelago.data.shards import ShardInfo

        if self._rows:
            self._flush(self._rows)
        if not self.chunks:
            raise DataError(f"shard {self.shard}: no samples to write")
        return ShardInfo(id=self.shard, file=shard_dir(self.shard), sha256=chunks_digest(self.chunks),
                         count=sum(c.count for c in self.chunks), chunks=list(self.chunks))


def write_chunked_shard(data_url: str, k: int, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                        chunk_bytes: int) -> ShardInfo:
    """Shard k, already in memory, as chunk files (the in-RAM preparation with data.shard_format=chunked)."""
    w = ChunkWriter(data_url, k, chunk_bytes)
    w.add(images, labels, index)
    return w.finish()


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkRef:
    """One chunk to read: its URL, expected sha256 and count, and a tag (its shard id) for mixed streams."""
    url: str
    sha256: str
    count: int
    tag: int


def chunk_refs(data_url: str, info: ShardInfo) -> list[ChunkRef]:
    """The chunks of a chunked shard, names checked so a manifest cannot point outside the data folder."""
    if info.chunks is None:
        raise DataError(f"{storage.join(data_url, info.file)}: shard {info.id} is not chunked")
    if not _SHARD_DIR.match(info.file) or any(not _CHUNK_NAME.match(c.file) for c in info.chunks):
        raise DataError(f"{storage.join(data_url, 'manifest.json')}: shard {info.id} names files outside "
                        f"shard-NNN/chunk-NNNNN.safetensors; {_RERUN}")
    if chunks_digest(info.chunks) != info.sha256 or sum(c.count for c in info.chunks) != info.count:
        raise DataError(f"{storage.join(data_url, 'manifest.json')}: shard {info.id}'s chunk list does not "
                        f"match its sha256/count; {_RERUN}")
    return [ChunkRef(storage.join(data_url, info.file, c.file), c.sha256, c.count, info.id) for c in info.chunks]


def check_sha256(digest: str, expected: str, url: str, what: str) -> None:
    """One DataError line when a file's sha256 is not the one the manifest recorded (shards, chunks, held-out
    split)."""
    if digest != expected:
        raise DataError(f"{url}: sha256 mismatch (manifest {expected[:12]}..., file {digest[:12]}...): "
                        f"the {what} is corrupt or was changed; {_RERUN}")


def read_chunk(ref: ChunkRef, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, index) of one chunk; a missing, changed or unparsable file is one DataError line."""
    from safetensors.torch import load

    try:
        data = storage.read_bytes(ref.url)
    except StorageError as exc:
        raise DataError(f"{exc}; {_RERUN}") from None
    if verify:
        check_sha256(storage.sha256_bytes(data), ref.sha256, ref.url, "chunk")
    try:
        t = load(data)
        x, y, idx = t["images"], t["labels"], t["index"]
    except Exception as exc:  # noqa: BLE001 - SafetensorError / KeyError for a foreign file
        raise DataError(f"{ref.url}: not a valid chunk ({type(exc).__name__}); {_RERUN}") from None
    if not x.shape[0] == y.shape[0] == idx.shape[0] == ref.count:
        raise DataError(f"{ref.url}: chunk holds {y.shape[0]} samples, manifest says {ref.count}; {_RERUN}")
    return x, y, idx


def read_chunked_shard(data_url: str, info: ShardInfo, verify: bool = True) -> ShardData:
    """A chunked shard loaded whole (the in-RAM loader, evaluation and small shards)."""
    from archipelago.data.shards import ShardData

    parts = [read_chunk(r, verify) for r in chunk_refs(data_url, info)]
    return ShardData(images=torch.cat([p[0] for p in parts]), labels=torch.cat([p[1] for p in parts]),
                     index=torch.cat([p[2] for p in parts]))


def verify_chunks(data_url: str, info: ShardInfo) -> None:
    """Every chunk of a chunked shard exists and matches its sha256 (read one at a time)."""
    for ref in chunk_refs(data_url, info):
        try:
            digest = storage.sha256_url(ref.url)
        except StorageError as exc:
            raise DataError(f"{exc}; {_RERUN}") from None
        check_sha256(digest, ref.sha256, ref.url, "chunk")


def use_stream(loader: str, chunked: bool) -> bool:
    """Whether training streams a shard: data.loader, with `auto` = stream exactly the chunked shards."""
    if loader == "stream" and not chunked:
        raise DataError("data.loader=stream needs chunked shards; prepare with data.shard_format=chunked "
                        "or use data.loader=auto|memory")
    return loader == "stream" or (loader == "auto" and chunked)


class ChunkStream:
    """An endless, seeded, rank-disjoint stream of (images, labels, tags, index) rows from chunk files.

    Epoch e visits the chunks in a permutation seeded by (seed, e), the same on every rank; with at least as
    many chunks as ranks, rank r takes chunks r::world_size, else every rank reads every chunk and keeps rows
    r::world_size. Rows pass a block shuffle buffer: each arriving chunk joins the pool, the pool is permuted
    (generator seeded by seed, rank, epoch) and all but `buffer` rows are emitted. Micro-batch i is a pure
    function of i, so a resumed run gets the same batches; `batch` fast-forwards by whole epochs (no I/O) and
    then replays the rest of one epoch.
    """

    def __init__(self, refs: list[ChunkRef], rank: int = 0, world_size: int = 1, seed: int = 0,
                 buffer: int = 4096, verify: bool = True, prefetch: int = 2,
                 keep: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if not refs:
            raise DataError("streamed shard has no chunks; re-run `archipelago data prepare`")
        self.refs, self.rank, self.world_size, self.seed = refs, rank, world_size, seed
        self.buffer, self.verify, self.keep = buffer, verify, keep   # keep: index -> bool mask of rows to use
        self.deal_chunks = len(refs) >= world_size
        if self.epoch_rows(0) == 0:
            raise DataError(f"shard has {sum(r.count for r in refs)} samples, fewer than the {world_size} ranks "
                            "training it")
        self._pool = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="chunk-prefetch")
        self._prefetch = max(1, prefetch)
        self._it: Iterator[tuple[torch.Tensor, ...]] | None = None
        self._pos = -1
        self._cur: tuple[torch.Tensor, ...] | None = None   # the block being consumed, from row self._off
        self._off = 0

    # --- epoch layout (no I/O) ---
    def _order(self, epoch: int) -> list[ChunkRef]:
        perm = torch.randperm(len(self.refs), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        order = [self.refs[int(i)] for i in perm]
        return order[self.rank::self.world_size] if self.deal_chunks else order

    def _rank_rows(self, count: int) -> int:
        return count if self.deal_chunks else len(range(self.rank, count, self.world_size))

    def epoch_rows(self, epoch: int) -> int:
        """Rows this rank sees in epoch `epoch`."""
        return sum(self._rank_rows(r.count) for r in self._order(epoch))

    # --- reading ---
    def _load(self, ref: ChunkRef) -> tuple[torch.Tensor, ...]:
        x, y, idx = read_chunk(ref, self.verify)
        rows = (x, y, torch.full((y.shape[0],), ref.tag, dtype=torch.int64), idx)
        if not self.deal_chunks:
            rows = tuple(t[self.rank::self.world_size] for t in rows)
        if self.keep is not None:
            rows = tuple(t[self.keep(idx if self.deal_chunks else idx[self.rank::self.world_size])] for t in rows)
        return rows

    def _rows(self, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Shuffled row blocks from `epoch` on, forever. The next `prefetch` chunks load on threads meanwhile,
        across epoch boundaries too, so the loop never waits for a chunk unless the store is slower than it."""
        def refs() -> Iterator[tuple[int, ChunkRef]]:
            e = epoch
            while True:
                for r in self._order(e):
                    yield e, r
                e += 1

        src = refs()
        pending: deque[tuple[int, Future]] = deque()
        for _ in range(self._prefetch):
            e, r = next(src)
            pending.append((e, self._pool.submit(self._load, r)))
        current = epoch
        g = self._generator(current)
        pool: tuple[torch.Tensor, ...] | None = None
        while True:
            e, fut = pending.popleft()
            e_next, r_next = next(src)
            pending.append((e_next, self._pool.submit(self._load, r_next)))
            if e != current:                                  # epoch `current` is over: flush its pool
                if pool is not None and pool[0].shape[0]:
                    yield tuple(t[torch.randperm(pool[0].shape[0], generator=g)] for t in pool)
                pool, current, g = None, e, self._generator(e)
            chunk = fut.result()
            pool = chunk if pool is None else tuple(torch.cat([a, b]) for a, b in zip(pool, chunk))
            n = pool[0].shape[0]
            if n > self.buffer:
                perm = torch.randperm(n, generator=g)
                emit, keep = perm[: n - self.buffer], perm[n - self.buffer:]
                yield tuple(t[emit] for t in pool)
                pool = tuple(t[keep] for t in pool)

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank) * 65_537 + epoch)

    def _seek(self, pos: int) -> None:
        epoch = 0
        while self.keep is None and pos >= (n := self.epoch_rows(epoch)):   # filtered: rows unknown, replay
            pos, epoch = pos - n, epoch + 1
        self._it, self._cur, self._off = self._rows(epoch), None, 0
        while pos:
            pos -= self._take(pos)[0].shape[0]

    def _take(self, n: int) -> tuple[torch.Tensor, ...]:
        """Up to n rows from the current block (views, no copy), moving to the next block when it is used up."""
        if self._cur is None or self._off >= self._cur[0].shape[0]:
            self._cur, self._off = next(self._it), 0  # type: ignore[arg-type]
        take = min(n, self._cur[0].shape[0] - self._off)
        rows = tuple(t[self._off:self._off + take] for t in self._cur)
        self._off += take
        return rows

    def next_rows(self, n: int) -> tuple[torch.Tensor, ...]:
        """The next n rows of the stream: (images, labels, tags, index)."""
        if self._it is None:
            self._seek(0)
            self._pos = 0
        parts = [self._take(n)]
        got = parts[0][0].shape[0]
        while got < n:
            parts.append(self._take(n - got))
            got += parts[-1][0].shape[0]
        self._pos += n
        return parts[0] if len(parts) == 1 else tuple(torch.cat([p[j] for p in parts]) for j in range(4))

    def batch(self, micro_index: int, micro_batch: int) -> tuple[torch.Tensor, ...]:
        """Micro-batch `micro_index` (rows [i*b, (i+1)*b) of this rank's stream)."""
        pos = micro_index * micro_batch
        if pos != self._pos:
            self._seek(pos)
            self._pos = pos
        return self.next_rows(micro_batch)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------
# The router over every chunked shard: one mixed stream, a held-out split by source index
# ----------------------------------------------------------------------------------------------------

def heldout_mask(index: torch.Tensor, seed: int, fraction: float) -> torch.Tensor:
    """Whether each sample (by its source index) is held out: a seeded hash, so no list of ids is kept."""
    return ((index * 2_654_435_761 + seed * 97 + 12_345) % 10_000) < round(fraction * 10_000)


def router_stream(data_url: str, manifest: Any, seed: int, buffer: int, holdout: float,
                  max_eval: int = 4096) -> tuple[ChunkStream, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(training stream over all shards, tags = shard ids, held-out rows removed; held-out (images, labels,
    shard ids), at most `max_eval` of them, gathered by one streaming pass)."""
    refs = [r for info in manifest.shards for r in chunk_refs(data_url, info)]
    xs, ys, cs, n = [], [], [], 0
    for ref in refs:
        if n >= max_eval:
            break
        x, y, idx = read_chunk(ref)
        m = heldout_mask(idx, seed, holdout)
        xs.append(x[m][: max_eval - n])
        ys.append(y[m][: max_eval - n])
        cs.append(torch.full((int(xs[-1].shape[0]),), ref.tag, dtype=torch.int64))
        n += int(xs[-1].shape[0])
    if n == 0:
        raise DataError(f"{data_url}: too few samples to hold any out for the router's metrics")
    stream = ChunkStream(refs, seed=seed, buffer=buffer, keep=lambda idx: ~heldout_mask(idx, seed, holdout))
    return stream, (torch.cat(xs), torch.cat(ys), torch.cat(cs))
