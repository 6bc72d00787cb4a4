"""`parallelize_for_inference(model, pcfg, comm) -> model_fn`: parallel modes applied from outside.

Like torchtitan's `parallelize_*` and DistriFusion's `DistriUNetPP`, the model file never changes: we walk
`named_children()` and `setattr` parallel twins (a registry: layer class -> twin) around the untouched
modules, then wrap the root (patch split, CFG split, expert placement). With world size 1 the model is
returned as it is. The returned `model_fn(x, t, y, step=k)` has the expert call signature plus the
explicit sampler step that DistriFusion's staleness depends on; `parallel_sample` passes it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from archipelago.errors import ConfigError, NotYetImplemented
from archipelago.inference import pipefusion, sequence
from archipelago.inference.comm import Comm, Group
from archipelago.inference.config import SEQUENCE_MODES, Mode, ParallelConfig, experts_for_rank
from archipelago.inference.distrifusion import DisplacedKVExchange
from archipelago.inference.patch import LAYER_TWINS, ROOT_TWINS, PatchContext

log = logging.getLogger(__name__)

RouteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class StepAware(nn.Module):
    """Base of parallel model_fns: forward(x, t, y, step=None); `finish()` drains in-flight communication."""

    num_classes: int

    def finish(self) -> None:
        for child in self.children():
            if hasattr(child, "finish"):
                child.finish()


def swap_twins(module: nn.Module, twins: Mapping[type[nn.Module], type[nn.Module]], ctx: object) -> int:
    """Replace (in place, recursively) every child whose class is in `twins` by `twin(child, ctx)`."""
    swapped = 0
    for name, child in list(module.named_children()):
        twin = twins.get(type(child))
        if twin is not None:
            setattr(module, name, twin(child, ctx))
            swapped += 1
        else:
            swapped += swap_twins(child, twins, ctx)
    return swapped


# ----------------------------------------------------------------------------------------------------
# Wrappers of the root
# ----------------------------------------------------------------------------------------------------

class _Local(StepAware):
    """The plain model as a step-aware model_fn (the inner part of cfg_parallel without patches)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.num_classes = module.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                step: int | None = None) -> torch.Tensor:
        return self.module(x, t, y)


class SplitParallel(StepAware):
    """Root twin of a mode that splits one sample over ranks (patches, sequence chunks, pipeline stages), as a
    step-aware model_fn."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.root = root
        self.num_classes = root.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                step: int | None = None) -> torch.Tensor:
        return self.root(x, t, y, step=step)


class CfgParallel(StepAware):
    """Conditional and unconditional branch on different ranks.

    The sampler sends one batch [cond; null] of 2N (see `guided_velocity`); the rank with cfg index c
    evaluates half c through `inner` (itself possibly patch-parallel), and one all-gather over the CFG
    group rebuilds the 2N velocities, so guidance is combined exactly as on one device.
    """

    def __init__(self, inner: StepAware, comm: Comm, group: Group):
        super().__init__()
        self.inner = inner
        self.comm = comm
        self.group = group
        self.num_classes = inner.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                step: int | None = None) -> torch.Tensor:
        n = x.shape[0]
        if n % self.group.size:
            raise ValueError(f"cfg_parallel splits the batch in {self.group.size} branches; got batch {n} "
                             f"(sample with cfg_scale != 1, which sends [cond; null])")
        if step is not None:
            self.comm.step = step
        i, k = self.group.index, n // self.group.size
        v = self.inner(x[i * k:(i + 1) * k], t[i * k:(i + 1) * k], y[i * k:(i + 1) * k], step=step)
        return self.comm.all_gather(v.contiguous(), self.group, "cfg", dim=0)    # [2N, C, H, W]


def topk_weights(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Router logits [N, K] -> mixture weights [N, K]: softmax, keep the top-k, renormalise (None: all)."""
    probs = logits.float().softmax(dim=-1)                                       # [N, K]
    if top_k is None or top_k >= probs.shape[-1]:
        return probs
    top = probs.topk(top_k, dim=-1)
    w = torch.zeros_like(probs).scatter(-1, top.indices, top.values)             # [N, K]
    return w / w.sum(dim=-1, keepdim=True)


class ExpertParallel(StepAware):
    """Ensemble with experts spread over the ranks of an expert group.

    Every rank runs the (small, replicated) router; rank r evaluates only its own experts, each on the
    samples routed to it, scales by the routing weights, and one all-reduce sums the weighted velocities:
    v = sum_k w_k v_k as on one device, with each sample's selected experts running on different ranks.
    """

    def __init__(self, experts: Mapping[int, nn.Module], route: RouteFn, num_experts: int, num_classes: int,
                 comm: Comm, group: Group):
        super().__init__()
        self.experts = nn.ModuleDict({str(k): m for k, m in experts.items()})
        self.route = route
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.comm = comm
        self.group = group

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                step: int | None = None) -> torch.Tensor:
        if step is not None:
            self.comm.step = step
        w = self.route(x, t, y)                                                  # [N, K]
        v = torch.zeros(x.shape, dtype=torch.float32, device=x.device)           # [N, C, H, W]
        for key, expert in self.experts.items():
            k = int(key)
            sel = (w[:, k] > 0).nonzero().squeeze(1)                             # [n_k]
            if sel.numel() == 0:
                continue
            v_k = expert(x[sel], t[sel], y[sel]).float()                         # [n_k, C, H, W]
            v.index_add_(0, sel, w[sel, k].view(-1, *[1] * (x.dim() - 1)) * v_k)
        return self.comm.all_reduce(v, self.group, "expert")                      # [N, C, H, W]


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------

def _apply_twins(model: nn.Module, mode: Mode, root_twins: Mapping[type[nn.Module], type[nn.Module]],
                 layer_twins: Mapping[type[nn.Module], type[nn.Module]], ctx: object,
                 group: Group) -> StepAware:
    """Swap the layer twins into `model`, wrap its root: what every image-splitting mode does."""
    root_twin = root_twins.get(type(model))
    if root_twin is None:
        raise NotYetImplemented(f"{mode.value}: no parallel twin for {type(model).__name__} "
                                f"(supported: {', '.join(c.__name__ for c in root_twins)})")
    swapped = swap_twins(model, layer_twins, ctx)
    if mode is Mode.distrifusion:
        ctx.exchange = DisplacedKVExchange(ctx)
    log.info("%s: %d layers wrapped, rank %d of group %s", mode.value, swapped, group.index, group.ranks)
    return SplitParallel(root_twin(model, ctx))


def _image_parallel(model: nn.Module, pcfg: ParallelConfig, comm: Comm, group: Group) -> StepAware:
    """The twin layout of `pcfg` over `group` (the ranks sharing one sample), or the plain model."""
    scheme = pcfg.patch_scheme
    if scheme is not None:
        ctx = PatchContext(comm=comm, group=group, scheme=scheme, warmup_steps=pcfg.warmup_steps,
                           comm_group_layers=pcfg.comm_group_layers)
        return _apply_twins(model, scheme, ROOT_TWINS, LAYER_TWINS[scheme], ctx, group)
    if pcfg.mode in SEQUENCE_MODES:   # both sub-partitions on every rank, in the same order
        ctx = sequence.SequenceContext(comm=comm, group=group, ulysses=comm.my_group(pcfg.ulysses_groups()),
                                       ring=comm.my_group(pcfg.ring_groups()))
        return _apply_twins(model, pcfg.mode, sequence.ROOT_TWINS, sequence.LAYER_TWINS, ctx, group)
    if pcfg.mode is Mode.pipefusion:
        ctx = pipefusion.PipeContext(comm=comm, group=group, num_patches=pcfg.num_pipe_patches,
                                     warmup_steps=pcfg.warmup_steps)
        return _apply_twins(model, pcfg.mode, pipefusion.ROOT_TWINS, pipefusion.LAYER_TWINS, ctx, group)
    return _Local(model)


def ensemble_parts(ensemble: object) -> tuple[Sequence[nn.Module], RouteFn, int]:
    """(experts, route(x, t, y) -> weights [N, K], num_classes) of an ensemble.

    Accepted: `archipelago.ensemble.Ensemble` (its own `route`, CFG-pair aware, so expert_parallel routes
    exactly as one device does), or any object with `experts`, `router` (logits) and `top_k` (None: full).
    """
    experts = getattr(ensemble, "experts", None)
    if experts is None:
        raise ConfigError(f"expert_parallel needs an ensemble (experts + router), "
                          f"got {type(ensemble).__name__}")
    route = getattr(ensemble, "route", None)
    if route is None:
        router, top_k = ensemble.router, getattr(ensemble, "top_k", None)

        def route(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return topk_weights(router(x, t, y), top_k)
    num_classes = getattr(ensemble, "num_classes", None)
    if num_classes is None:
        num_classes = experts[0].num_classes
    return list(experts), route, num_classes


def parallelize_expert_shard(experts: Mapping[int, nn.Module], route: RouteFn, num_experts: int,
                             num_classes: int, pcfg: ParallelConfig, comm: Comm) -> StepAware:
    """expert_parallel from this rank's experts only (index -> module): what a launcher builds so that a
    rank never loads the weights of experts it does not run."""
    if pcfg.mode is not Mode.expert_parallel or pcfg.world_size != comm.world_size:
        raise ConfigError(f"parallelize_expert_shard needs mode=expert_parallel on {comm.world_size} ranks, "
                          f"got {pcfg.describe()}")
    group = comm.my_group(pcfg.inner_groups())
    want = experts_for_rank(num_experts, pcfg.expert_degree, group.index)
    if sorted(experts) != want:
        raise ConfigError(f"expert_parallel: rank {comm.rank} must hold experts {want}, "
                          f"got {sorted(experts)}")
    return ExpertParallel(experts, route, num_experts, num_classes, comm, group)


def parallelize_for_inference(model: nn.Module | object, pcfg: ParallelConfig, comm: Comm) -> Callable:
    """Apply `pcfg` to `model` (a DiT, or an ensemble for expert_parallel); returns model_fn(x, t, y, step).

    Collective: every rank calls it (process groups are created here, in the same order everywhere). The
    model is modified in place (twins are set into it), as DistriFusion does; keep a copy if the plain
    model is still needed. World size 1 returns `model` itself.
    """
    if pcfg.world_size != comm.world_size:
        raise ConfigError(f"parallel config is for world_size={pcfg.world_size} but "
                          f"{comm.world_size} ranks run")
    if pcfg.world_size == 1:
        return model
    inner_group = comm.my_group(pcfg.inner_groups())
    cfg_group = comm.my_group(pcfg.cfg_groups())
    if pcfg.mode is Mode.expert_parallel:
        experts, route, num_classes = ensemble_parts(model)
        mine = experts_for_rank(len(experts), pcfg.expert_degree, inner_group.index)
        return ExpertParallel({k: experts[k] for k in mine}, route, len(experts), num_classes, comm,
                              inner_group)
    inner = _image_parallel(model, pcfg, comm, inner_group)
    if pcfg.cfg_degree > 1:
        return CfgParallel(inner, comm, cfg_group)
    return inner
