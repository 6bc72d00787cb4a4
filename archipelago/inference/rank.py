"""What every inference rank does around its work, image or video: pick its device, join (or reuse) the
process group and leave it cleanly, and report a failure as one line naming itself. The launchers
(torchrun, Ray actors, local processes) differ only in how they start ranks; each rank runs this."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from archipelago.errors import ArchipelagoError, ConfigError
from archipelago.experts.train import _exit as rank_exit  # noqa: F401 - torchrun ranks exit as training ranks do


def rank_device(device: str) -> torch.device:
    """cpu | cuda | auto -> this rank's device; on a GPU the one LOCAL_RANK names (one GPU per rank)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no GPU")
    local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def init_process_group(rank: int, world_size: int, init_method: str | None, device: torch.device,
                       timeout_s: float = 300) -> None:
    """gloo on CPU, nccl on GPU; init_method None reads MASTER_ADDR/PORT (torchrun's env://)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def close_group(ok: bool) -> None:
    """End a parallel run's process group. The modes have already waited on every async handle (DistriFusion's
    last K/V exchange, DualParal's in-flight sends); on success a barrier then makes sure no rank destroys
    the group while a peer still talks to it (gloo aborts the process then: "terminate called without an
    active exception"). After a failure there is no barrier (a dead peer never arrives): destroy only."""
    if not dist.is_initialized():
        return
    if ok and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


@contextmanager
def process_group(world_size: int, rank: int | None, init_method: str | None,
                  device: torch.device) -> Iterator[None]:
    """Join a group of world_size ranks for the body and close it after (only if joined here: an existing
    default group is reused and left alive). rank None: torchrun's RANK."""
    owns = world_size > 1 and not dist.is_initialized()
    if owns:
        init_process_group(int(os.environ["RANK"]) if rank is None else rank, world_size, init_method, device)
    ok = False
    try:
        yield
        ok = True
    finally:
        if owns:
            close_group(ok)


def rank_error_line(exc: BaseException) -> str:
    """`error: rank R: <why>`: every failing rank names itself and its own cause (not only torchrun's summary)."""
    from archipelago.errors import failure_line
    from archipelago.storage import redact

    if isinstance(exc, ArchipelagoError):     # our own line already names the culprit (same on every rank)
        return f"error: {redact(str(exc))}"
    return f"error: rank {os.environ.get('RANK', '0')}: {failure_line(exc)}"
