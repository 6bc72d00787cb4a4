"""Training strategies applied from outside an unmodified expert: `apply_strategy(model, cfg, device)` turns
a plain DiT into something the loop drives the same way whether it runs single, DDP, FSDP2 or DeepSpeed.

The loop only ever calls `Wrapped.module(x, t, y)`, `backward(loss, sync)`, `step()`, `set_lr(lr)`,
`update_ema(ema)`, `full_state_dict()` and `save_optimizer`/`load_optimizer`; everything that differs
between strategies (no_sync, sharded clipping, DeepSpeed's own backward/step, gathering sharded weights)
lives behind those calls. The learning rate is set by the loop at every step (so a resumed run needs only
the step number, and DeepSpeed needs no scheduler object).

Optimizer state on disk, and what loading it trusts, is described in checkpoint.py.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from archipelago.config import ExpertConfig
from archipelago.errors import CheckpointError, ConfigError
from archipelago.experts.checkpoint import (
    SafeFileSystemReader,
    WeightsOnlyLoadPlanner,
    check_weights_only,
    read_optimizer_state,
    write_optimizer_state,
)
from archipelago.experts.precision import check_precision, compile_module

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def micro_batch_size(cfg: ExpertConfig, world_size: int) -> int:
    """Samples per rank per micro-step: batch_size = micro * grad_accum * world_size, exactly."""
    per = world_size * cfg.grad_accum
    if cfg.batch_size % per:
        raise ConfigError(f"field 'expert.batch_size': {cfg.batch_size} is not divisible by grad_accum "
                          f"({cfg.grad_accum}) x world size ({world_size}); use a multiple of {per}")
    return cfg.batch_size // per


def make_optimizer(params: Any, cfg: ExpertConfig) -> torch.optim.Optimizer:
    # foreach=False: the same per-parameter kernels on every strategy, so single/DDP/FSDP2 runs from one
    # seed agree to float noise (the foreach path groups tensors differently for DTensors).
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                             foreach=False)


# ----------------------------------------------------------------------------------------------------
# The uniform interface
# ----------------------------------------------------------------------------------------------------

class Wrapped:
    """A model under a strategy. Subclasses override only what their strategy does differently."""

    strategy = "single"

    def __init__(self, model: nn.Module, module: nn.Module, optimizer: Any, cfg: ExpertConfig,
                 device: torch.device):
        self.model = model          # the DiT itself (sharded in place for FSDP2 / ZeRO-3)
        self.module = module        # what the loop calls: model, DDP(model) or the DeepSpeed engine
        self.optimizer = optimizer
        self.cfg = cfg
        self.device = device
        self.rank, self.world_size = world()

    def describe(self) -> str:
        return f"{self.strategy}: plain module on {self.device}"

    # --- one micro-step / one optimizer step ---
    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Backward of one micro-batch; `sync=False` on all but the last micro-batch of a step.

        The loss is divided by grad_accum so the accumulated gradient is the mean over the global batch.
        """
        (loss / self.cfg.grad_accum).backward()

    def step(self, skip_nonfinite: bool = False) -> torch.Tensor:
        """Clip (if enabled), optimizer step, zero grads; returns the global grad norm before clipping.

        skip_nonfinite: when the norm is inf/nan, drop the gradients instead of stepping (the norm is global,
        so every rank decides alike). A 0-dim tensor, not a float: converting it would synchronise with the
        GPU on every step.
        """
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = _full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)).detach()
        if not (skip_nonfinite and not bool(torch.isfinite(norm))):
            try:
                self.optimizer.step()
            except RuntimeError as exc:   # an LR so large that Adam's step size overflows float32
                if "overflow" not in str(exc):
                    raise
                norm = torch.full_like(norm, float("inf"))
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # --- weights ---
    def update_ema(self, ema: Any) -> None:
        """ema.update from the current full weights (params are whole on every rank here)."""
        ema.update(self.model)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded weights on CPU on rank 0 ({} on other ranks). A collective: call on every rank."""
        if self.rank != 0:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    # --- optimizer state ---
    def save_optimizer(self, local_dir: Path) -> None:
        """Write this strategy's optimizer state under local_dir (a collective; only rank 0 writes here,
        since single/DDP optimizer states are identical on every rank)."""
        if self.rank == 0:
            write_optimizer_state(self.optimizer.state_dict(), Path(local_dir))

    def load_optimizer(self, local_dir: Path) -> None:
        read_optimizer_state(self.optimizer, Path(local_dir), self.strategy)


class _DDPWrapped(Wrapped):
    strategy = "ddp"

    def describe(self) -> str:
        return f"ddp: DistributedDataParallel over {self.world_size} ranks ({dist.get_backend()}) on {self.device}"

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        ctx = contextlib.nullcontext() if sync else self.module.no_sync()
        with ctx:
            (loss / self.cfg.grad_accum).backward()


class _FSDP2Wrapped(Wrapped):
    strategy = "fsdp2"

    def describe(self) -> str:
        n = len(getattr(self.model, "blocks", []))
        return (f"fsdp2: fully_shard on {n} blocks + root over {self.world_size} ranks "
                f"({dist.get_backend()}) on {self.device}")

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        self.model.set_requires_gradient_sync(sync)
        (loss / self.cfg.grad_accum).backward()

    def update_ema(self, ema: Any) -> None:
        # All-gather each parameter (a collective on every rank); the EMA stays a plain full model.
        ema.update({n: _full(p) for n, p in self.model.named_parameters()})

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().clone() for k, v in sd.items()} if self.rank == 0 else {}

    def save_optimizer(self, local_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.save({"optimizer": osd}, storage_writer=dcp.FileSystemWriter(str(local_dir)))

    def load_optimizer(self, local_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        if not (Path(local_dir) / ".metadata").is_file():
            raise CheckpointError(f"{Path(local_dir).name}/.metadata: missing (FSDP2 optimizer state expected)")
        osd = get_optimizer_state_dict(self.model, self.optimizer)
        state = {"optimizer": osd}
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(str(local_dir)),
                     planner=WeightsOnlyLoadPlanner())
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - DCP wraps per-rank failures in CheckpointException
            raise CheckpointError(f"{Path(local_dir).name}: FSDP2 optimizer state cannot be loaded "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state["optimizer"])


class _DeepSpeedWrapped(Wrapped):
    strategy = "deepspeed"
    TAG = "ds"

    def describe(self) -> str:
        return (f"deepspeed: ZeRO-{self.cfg.zero_stage} over {self.world_size} ranks on {self.device} "
                f"(micro-batch {self.module.train_micro_batch_size_per_gpu()}, "
                f"grad accum {self.module.gradient_accumulation_steps()})")

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        # DeepSpeed scales by 1/grad_accum itself and counts micro-steps in engine.step(); the real
        # optimizer step (clip + update + zero) happens inside the step() of the last micro-batch.
        self.module.backward(loss)
        self.module.step()

    def step(self, skip_nonfinite: bool = False) -> torch.Tensor:
        # DeepSpeed stepped inside backward(); a non-finite step cannot be skipped here (the loop stops).
        norm = self.module.get_global_grad_norm()
        return _full(norm if norm is not None else float("nan")).detach()

    def set_lr(self, lr: float) -> None:
        for group in self.module.optimizer.param_groups:
            group["lr"] = lr

    @contextlib.contextmanager
    def _gathered(self) -> Iterator[None]:
        if self.cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def update_ema(self, ema: Any) -> None:
        with self._gathered():
            ema.update(self.model)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        with self._gathered():
            if self.rank != 0:
                return {}
            return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def save_optimizer(self, local_dir: Path) -> None:
        self.module.save_checkpoint(str(local_dir), tag=self.TAG, save_latest=False)

    def load_optimizer(self, local_dir: Path) -> None:
        tag_dir = Path(local_dir) / self.TAG
        if not tag_dir.is_dir():
            raise CheckpointError(f"{Path(local_dir).name}/{self.TAG}: missing (DeepSpeed state expected)")
        for f in sorted(tag_dir.glob("*.pt")):
            check_weights_only(f)
        path, _ = self.module.load_checkpoint(str(local_dir), tag=self.TAG, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{tag_dir.name}: DeepSpeed could not load its checkpoint")


# ----------------------------------------------------------------------------------------------------
# apply_strategy
# ----------------------------------------------------------------------------------------------------

def apply_strategy(model: nn.Module, cfg: ExpertConfig, device: torch.device | str) -> Wrapped:
    """Place `model` on `device`, apply cfg.strategy, build the optimizer; one signature for all strategies.

    Needs an initialised process group for ddp/fsdp2/deepspeed with world size > 1 (deepspeed and fsdp2
    also run at world size 1 when a group exists). Logs what it applied.
    """
    device = torch.device(device)
    rank, world_size = world()
    strategy = cfg.strategy
    if strategy != "single" and not dist.is_initialized():
        raise ConfigError(f"field 'expert.strategy': {strategy!r} needs torch.distributed; launch with torchrun "
                          f"or Ray Train, or use strategy=single")
    micro_batch_size(cfg, world_size)  # validate the batch split up front
    check_precision(cfg.precision, device)
    model.to(device)
    if cfg.compile and strategy != "fsdp2":    # fsdp2 compiles per block, before sharding (below)
        compile_module(model)

    if strategy == "single":
        wrapped: Wrapped = Wrapped(model, model, make_optimizer(model.parameters(), cfg), cfg, device)
    elif strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids)
        wrapped = _DDPWrapped(model, ddp, make_optimizer(model.parameters(), cfg), cfg, device)
    elif strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # With gloo the mesh and the model must stay on CPU (moving to CUDA under gloo segfaults).
        mesh = init_device_mesh(device.type, (world_size,))
        # bf16: all-gather and compute in bf16, reduce gradients in fp32; the sharded master weights stay fp32.
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if cfg.precision == "bf16" else MixedPrecisionPolicy())
        for block in getattr(model, "blocks", []):
            if cfg.compile:
                compile_module(block)                 # torchtitan's order: compile each block, then shard it
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        wrapped = _FSDP2Wrapped(model, model, make_optimizer(model.parameters(), cfg), cfg, device)
    elif strategy == "deepspeed":
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if world_size == 1:   # our own one-rank group (in-process run): DeepSpeed insists on a LOCAL_RANK
            os.environ.setdefault("LOCAL_RANK", "0")
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model.parameters(), cfg),
            config=deepspeed_config(cfg, world_size), dist_init_required=False)
        wrapped = _DeepSpeedWrapped(model, engine, engine.optimizer, cfg, device)
        wrapped.model = engine.module
    else:  # pragma: no cover - config validation forbids it
        raise ConfigError(f"field 'expert.strategy': unknown strategy {strategy!r}")
    if rank == 0:
        log.info("applied %s", wrapped.describe())
    return wrapped


def deepspeed_config(cfg: ExpertConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict, built from ExpertConfig (no JSON file to keep in sync)."""
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": float(cfg.grad_clip),  # 0 disables
        "zero_optimization": {"stage": cfg.zero_stage},
        # Our AdamW is torch's; DeepSpeed only vouches for its own fused optimizers (which need compiled ops).
        "zero_allow_untested_optimizer": True,
        # bf16 is autocast, as in the other strategies: DeepSpeed's own `bf16` mode would cast the module's
        # weights, so the EMA and checkpoints would read rounded weights. Its engine turns an outer autocast
        # *off* inside forward unless `torch_autocast` is enabled, so that section carries the precision.
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "torch_autocast": {"enabled": cfg.precision == "bf16", "dtype": "bfloat16"},
        # Each node writes its own files; nothing assumes a shared filesystem (we upload through storage).
        "checkpoint": {"use_node_local_storage": True},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------

def _full(t: Any) -> torch.Tensor:
    """A DTensor's full value (collective), or the tensor/number itself."""
    if hasattr(t, "full_tensor"):
        return t.full_tensor()
    return torch.as_tensor(t)
