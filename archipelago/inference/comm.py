"""`Comm`: every collective of parallel inference goes through one object that counts what it moves.

Bytes are counted per layer type ("attn_kv", "output", "cfg", "expert", ...) and per sampler step, so the
benchmark reports measured traffic instead of formulas. Blocking calls are timed between device syncs;
an async all-gather is timed where its owner waits on it (the communication that was *not* hidden).

Byte convention (what this rank receives over the wire, independent of the backend's algorithm):
all_gather: (group_size - 1) x local bytes; all_reduce: 2 (group_size - 1) / group_size x bytes (a ring
reduce-scatter + all-gather); all_to_all: (group_size - 1) / group_size x bytes (every chunk but this rank's
own); point to point: the tensor's bytes, counted once, by the sender (`recv` adds only the time it waited,
so a ring's bytes are not counted twice).
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Group:
    """A process group seen from one rank: its global ranks, this rank's index, the torch handle."""

    ranks: list[int]
    index: int                     # position of this rank in `ranks`
    pg: Any = None                 # torch ProcessGroup; None when the group has one member

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass
class _Counter:
    bytes: int = 0
    calls: int = 0
    async_calls: int = 0
    seconds: float = 0.0


@dataclass
class CommStats:
    """Accumulated traffic of one rank: per layer type, per step, and wall time spent waiting."""

    by_type: dict[str, _Counter] = field(default_factory=lambda: defaultdict(_Counter))
    by_step: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": sum(c.bytes for c in self.by_type.values()),
            "by_type": {k: vars(c).copy() for k, c in sorted(self.by_type.items())},
            "by_step": dict(sorted(self.by_step.items())),
        }


class AsyncGather:
    """Handle of an async all-gather: `wait()` returns the gathered tensors (one per group member)."""

    def __init__(self, comm: Comm, work: Any, out: list[torch.Tensor], layer_type: str):
        self._comm, self._work, self._out, self._layer_type = comm, work, out, layer_type

    def wait(self) -> list[torch.Tensor]:
        """Order this stream after the gather (no host sync on a GPU) and return its tensors."""
        if self._work is not None:
            token = self._comm._clock()
            self._work.wait()
            self._comm._time(self._layer_type, token)
            self._work = None
        return self._out


class RingPass:
    """Handle of one ring hop (`Comm.ring_pass`): `wait()` returns the tensor the previous member sent."""

    def __init__(self, comm: Comm, works: list[Any], out: torch.Tensor, sent: torch.Tensor, layer_type: str):
        self._comm, self._works, self._out, self._sent, self._layer_type = comm, works, out, sent, layer_type

    def wait(self) -> torch.Tensor:
        if self._works:
            token = self._comm._clock()
            for work in self._works:
                work.wait()
            self._comm._time(self._layer_type, token)
            self._works, self._sent = [], None    # the send buffer may be freed now
        return self._out


class Comm:
    """Collectives over torch.distributed (or trivially over one rank) with byte and time accounting.

    `step` is set by the caller (the parallel model sets it from its explicit `step` argument) and keys
    the per-step byte counts. Build groups with `group(ranks)` on *every* rank in the same order: that is
    torch's rule for `new_group`.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.step = 0
        self._stats = CommStats()
        self._pending: list[tuple[str, Any, Any]] = []   # CUDA (layer_type, start, end) events not yet read
        self.world = Group(list(range(self.world_size)), self.rank,
                           dist.group.WORLD if self.distributed else None)

    # --- groups ---
    def group(self, ranks: Sequence[int]) -> Group | None:
        """A group of `ranks` (collective: every rank calls it); None for ranks outside it."""
        ranks = list(ranks)
        pg = None
        if len(ranks) > 1:
            pg = dist.group.WORLD if len(ranks) == self.world_size else dist.new_group(ranks)
        if self.rank not in ranks:
            return None
        return Group(ranks, ranks.index(self.rank), pg)

    def my_group(self, partition: Sequence[Sequence[int]]) -> Group:
        """Create every group of a partition of the ranks (all ranks, same order); return this rank's."""
        mine = None
        for ranks in partition:
            g = self.group(ranks)
            if g is not None:
                mine = g
        if mine is None:
            raise ValueError(f"rank {self.rank} is in no group of {partition}")
        return mine

    # --- accounting ---
    def sync(self) -> None:
        """Wait for the device: once around a whole timed run, never inside a collective (a no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def stats(self) -> CommStats:
        """The counters; reading them resolves pending CUDA timings (the only place that waits on events)."""
        for layer_type, start, end in self._pending:
            end.synchronize()
            self._stats.by_type[layer_type].seconds += start.elapsed_time(end) / 1000.0
        self._pending.clear()
        return self._stats

    def _clock(self) -> Any:
        """Start of a timed interval: a recorded CUDA event on a GPU, the wall clock on CPU."""
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _time(self, layer_type: str, start: Any) -> None:
        """Add the interval since `start` to `layer_type`'s seconds (on a GPU when `stats` is next read)."""
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((layer_type, start, end))
        else:
            self._stats.by_type[layer_type].seconds += time.perf_counter() - start

    def _count(self, layer_type: str, nbytes: float, is_async: bool = False) -> None:
        c = self._stats.by_type[layer_type]
        c.bytes += int(nbytes)
        c.calls += 1
        c.async_calls += int(is_async)
        self._stats.by_step[self.step] += int(nbytes)

    def reset_stats(self) -> None:
        self._stats, self._pending = CommStats(), []

    # --- collectives ---
    def all_gather(self, tensor: torch.Tensor, group: Group, layer_type: str, dim: int = 0) -> torch.Tensor:
        """Blocking all-gather; returns the members' tensors concatenated along `dim` in group order."""
        if group.size == 1:
            return tensor
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(group.size)]
        t0 = self._clock()
        dist.all_gather(out, tensor, group=group.pg)
        self._time(layer_type, t0)
        self._count(layer_type, (group.size - 1) * _nbytes(tensor))
        return torch.cat(out, dim=dim)

    def all_gather_async(self, tensor: torch.Tensor, group: Group, layer_type: str) -> AsyncGather:
        """Non-blocking all-gather: returns a handle; the caller must not touch `tensor` until it waits."""
        tensor = tensor.contiguous()
        if group.size == 1:
            return AsyncGather(self, None, [tensor], layer_type)
        out = [torch.empty_like(tensor) for _ in range(group.size)]
        work = dist.all_gather(out, tensor, group=group.pg, async_op=True)
        self._count(layer_type, (group.size - 1) * _nbytes(tensor), is_async=True)
        return AsyncGather(self, work, out, layer_type)

    def all_reduce(self, tensor: torch.Tensor, group: Group, layer_type: str) -> torch.Tensor:
        """Blocking in-place sum over the group; returns `tensor`."""
        if group.size == 1:
            return tensor
        t0 = self._clock()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group.pg)
        self._time(layer_type, t0)
        self._count(layer_type, 2 * (group.size - 1) / group.size * _nbytes(tensor))
        return tensor

    def all_to_all(self, tensor: torch.Tensor, group: Group, layer_type: str) -> torch.Tensor:
        """Blocking all-to-all over dim 0 (size = group size): chunk j goes to member j; returns, at index j,
        the chunk member j sent to this rank (Ulysses' head <-> token re-sharding)."""
        if group.size == 1:
            return tensor
        if tensor.shape[0] != group.size:
            raise ValueError(f"all_to_all: dim 0 is {tensor.shape[0]}, the group has {group.size} members")
        tensor = tensor.contiguous()
        out = torch.empty_like(tensor)
        t0 = self._clock()
        dist.all_to_all_single(out, tensor, group=group.pg)
        self._time(layer_type, t0)
        self._count(layer_type, (group.size - 1) / group.size * _nbytes(tensor))
        return out

    def ring_pass(self, tensor: torch.Tensor, group: Group, layer_type: str) -> RingPass:
        """Non-blocking ring hop: send `tensor` to the next member, receive the previous member's into a new
        tensor of the same shape; the caller computes while it travels and `wait()`s before using it."""
        tensor = tensor.contiguous()
        nxt = group.ranks[(group.index + 1) % group.size]
        prv = group.ranks[(group.index - 1) % group.size]
        out = torch.empty_like(tensor)
        # One isend and one irecv per hop, posted in rank order so gloo pairs them the same way everywhere.
        ops = [dist.P2POp(dist.isend, tensor, nxt), dist.P2POp(dist.irecv, out, prv)]
        works = dist.batch_isend_irecv(ops)
        self._count(layer_type, _nbytes(tensor), is_async=True)
        return RingPass(self, works, out, tensor, layer_type)

    def broadcast(self, tensor: torch.Tensor, src: int, group: Group, layer_type: str) -> torch.Tensor:
        """Blocking in-place broadcast from global rank `src`; each receiver counts the bytes it got."""
        if group.size == 1:
            return tensor
        t0 = self._clock()
        dist.broadcast(tensor, src, group=group.pg)
        self._time(layer_type, t0)
        if self.rank != src:
            self._count(layer_type, _nbytes(tensor))
        return tensor

    def send(self, tensor: torch.Tensor, dst: int, layer_type: str) -> None:
        t0 = self._clock()
        dist.send(tensor.contiguous(), dst)
        self._time(layer_type, t0)
        self._count(layer_type, _nbytes(tensor))

    def isend(self, tensor: torch.Tensor, dst: int, layer_type: str) -> Any:
        """Non-blocking send; returns the torch Work (keep `tensor` alive and unchanged until done)."""
        work = dist.isend(tensor, dst)
        self._count(layer_type, _nbytes(tensor), is_async=True)
        return work

    def recv(self, tensor: torch.Tensor, src: int, layer_type: str) -> torch.Tensor:
        """Blocking receive into `tensor`; its bytes were counted by the sender, the wait is counted here."""
        t0 = self._clock()
        dist.recv(tensor, src)     # on NCCL stream-ordered: later kernels on this stream see the data
        self._time(layer_type, t0)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
