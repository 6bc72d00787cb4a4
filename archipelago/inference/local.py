"""Local launcher: `pcfg.world_size` spawned processes on this machine (TCP rendezvous on 127.0.0.1).

For tests, benchmarks and notebooks, where neither torchrun nor Ray is wanted; each process calls the
same `run_parallel_sampling` as the other launchers. World size 1 runs in the calling process.
`spawn_ranks` is the process plumbing (rendezvous address, result queue, dead-rank detection) that the
video launcher shares.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from archipelago.inference.config import ParallelConfig
from archipelago.inference.runner import SamplingResult, SamplingSpec, run_parallel_sampling


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target: Callable[..., None], world_size: int, args: tuple[Any, ...],
                timeout_s: float = 120) -> list[Any]:
    """Run `target(rank, init_method, *args, out)` in `world_size` spawned processes; each puts
    (rank, result, traceback-or-None) on `out`. Returns the results in rank order.

    A rank that fails raises RuntimeError with its traceback; one that dies silently (killed, segfault) or
    a group that hangs past `timeout_s` raises too, and every process is reaped either way.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=target, args=(r, init_method, *args, out), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            try:
                rank, result, err = out.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"launch_local: ranks {dead} exited (code "
                                       f"{[procs[r].exitcode for r in dead]}) without a result") from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(results))
                    raise RuntimeError(f"launch_local: ranks {missing} gave no result within "
                                       f"{timeout_s:.0f}s") from None
                continue
            if err is not None:
                raise RuntimeError(f"rank {rank} failed:\n{err}")
            results[rank] = result
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]


def set_threads(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _worker(rank: int, init_method: str, spec: dict[str, Any], pcfg: dict[str, Any], warmup_runs: int,
            timed_runs: int, threads: int, out: Any) -> None:
    set_threads(threads)
    try:
        result = run_parallel_sampling(SamplingSpec(**spec), ParallelConfig(**pcfg), rank=rank,
                                       init_method=init_method, warmup_runs=warmup_runs,
                                       timed_runs=timed_runs)
        # Plain bytes, not a tensor: torch's pickler would share it by fd, gone once this process exits.
        result.samples = result.samples.numpy()
        out.put((rank, result, None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        out.put((rank, None, traceback.format_exc()))


def launch_local(spec: SamplingSpec, pcfg: ParallelConfig, warmup_runs: int = 0, timed_runs: int = 1,
                 threads_per_rank: int = 1, timeout_s: float = 120,
                 spawn: bool = False) -> list[SamplingResult]:
    """Every rank's SamplingResult in rank order; a failing rank raises RuntimeError with its traceback.

    World size 1 runs in this process unless `spawn` (a benchmark wants every row in a fresh process).
    """
    if pcfg.world_size == 1 and not spawn:
        return [run_parallel_sampling(spec, pcfg, warmup_runs=warmup_runs, timed_runs=timed_runs)]
    args = (spec.model_dump(), pcfg.model_dump(mode="json"), warmup_runs, timed_runs, threads_per_rank)
    results = spawn_ranks(_worker, pcfg.world_size, args, timeout_s)
    for r in results:
        r.samples = torch.from_numpy(r.samples)
    return results
