"""DualParal (Wang et al. 2025, "Minute-long videos with dual parallelisms") for our VideoDiT: a video far
longer than the training clips, denoised as a queue of frame blocks that flows through a ring pipeline of
model-layer stages, one stage per rank. Memory per rank depends on the block size and the number of steps,
never on the length of the video.

The block-wise schedule (identical on every rank, computed independently by each):
- The video of `num_frames` frames is cut into M = ceil(num_frames / block_frames) blocks of B frames.
- Iteration k (k = 0 .. steps + M - 2, so steps + M - 1 iterations): block k (if any) joins as pure noise;
  every active block b (0 <= k - b < steps) takes exactly one Euler step, its own step index k - b of the
  flow-matching schedule t = linspace(1, 0, steps + 1) (each block carries its own scheduler state);
  a block that has taken `steps` steps leaves (it is finished and streamed out).
  Blocks are visited newest (noisiest) first: b = min(k, M-1) down to max(0, k - steps + 1).
- Context: the input of block b is [last num_cat frames of block b-1 | block b], both as they were at the
  end of iteration k-1 (b-1 is one step ahead, i.e. less noisy; once finished, its clean tail). The
  context tokens are computed at every layer but their outputs are discarded. Temporal positions are
  consistent: `frame_offset` = b*B - num_cat is the context's index in the whole video (`positions=
  "absolute"`, the default). Our positions are additive sin-cos tables baked into the tokens, so (unlike
  the reference's RoPE, which re-positions cached keys for free) a model trained on F-frame clips sees
  positions far beyond F here; `positions="local"` starts every window at 0 instead (in-distribution for
  a short-clip model, but the cached neighbour K/V then carry their own window's positions).
- Neighbour K/V cache (what is cached, when it is reused): at every attention layer, the forward of
  block b+1 stores the keys and values ([2N|N, heads, num_cat*T, head_dim], T tokens per frame) of its
  *first num_cat own frames* (not its context). The next slot on the same rank in the same iteration is
  block b, whose attention at that layer appends them to its own K/V: b's queries see the first frames
  of the block that follows it without recomputing them (b+1 already saw b's last frames as context).
  The cache lives on the rank that owns the layer (never communicated), is overwritten by every slot and
  cleared at the start of each iteration (the first slot, the newest block, has no follower in flight).
- Coordinated noise: one seeded noise template of B frames; block b starts from the template with its
  frames permuted by a permutation seeded by (seed, b) (block 0: the identity). Every block starts from the
  same per-frame noises, which keeps content consistent across blocks.

The ring pipeline: rank r owns a contiguous slice of the DiT blocks (balanced; rank 0 also the patch
embedding, the last rank the final layer). For each slot (iteration, block) rank 0 embeds the window, runs
its layers and isends the hidden states to rank 1; ... the last rank runs its layers and the head and
isends the velocity of the block's own frames back to rank 0, which applies that block's Euler step.
Every rank derives the conditioning (t, label) itself, so only hidden states and velocities travel.
Rank 0 applies velocities lazily: before slot (k, b) it receives exactly those still missing for blocks
b and b-1 from iteration k-1. Because the schedule says every iteration reads the state of the previous
one, the pipeline changes *where* things run, not *what* is computed: world size N gives the same
output as world size 1 (same ops on the same inputs), and the pipeline stays full once at least N blocks
are in flight (a dependency lags its use by one iteration = the number of active blocks).
Unlike the reference implementation (asynchronous, whichever update has arrived), this is deterministic.
"""
from __future__ import annotations

import gc
import logging
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from archipelago.errors import ConfigError
from archipelago.experts.sampling import euler_step, sample, timesteps
from archipelago.inference.comm import Comm

log = logging.getLogger(__name__)

BlockSink = Callable[[int, torch.Tensor], None]   # (block index, clean frames [N, C, B, H, W]) -> None


# ----------------------------------------------------------------------------------------------------
# Configuration and schedule
# ----------------------------------------------------------------------------------------------------

class DualParalConfig(BaseModel):
    """What to generate and how the block-wise schedule runs; identical on every rank (plain data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_frames: int = Field(ge=1, description="Frames of the output video (the last block is trimmed).")
    block_frames: int = Field(8, ge=1, description="B: frames per block (<= the training clip length).")
    num_cat: int = Field(2, ge=0, description="Context frames taken from the previous block, and cached "
                         "neighbour K/V frames taken from the next block (0 disables both).")
    steps: int = Field(16, ge=1, description="Euler steps every block takes.")
    cfg_scale: float = Field(1.0, ge=0, description="Classifier-free guidance scale (1: none).")
    seed: int = Field(0, description="Seed of the noise template and the per-block permutations.")
    noise: Literal["coordinated", "independent"] = Field(
        "coordinated", description="coordinated: one template, permuted per block; independent: fresh noise.")
    positions: Literal["absolute", "local"] = Field(
        "absolute", description="absolute: frame_offset = index in the whole video; local: every window at 0.")
    kv_cache: bool = Field(True, description="Attend to the cached K/V of the next block's first frames.")

    @model_validator(mode="after")
    def _check(self) -> DualParalConfig:
        if self.num_cat > self.block_frames:
            raise ValueError(f"num_cat={self.num_cat} must be <= block_frames={self.block_frames} (context "
                             f"comes from the previous block only)")
        return self

    @property
    def num_blocks(self) -> int:
        return -(-self.num_frames // self.block_frames)

    @property
    def num_iterations(self) -> int:
        return self.steps + self.num_blocks - 1

    def slots(self, iteration: int) -> list[Slot]:
        """The blocks denoised in `iteration`, newest (noisiest) first, each with its own step index."""
        newest = min(iteration, self.num_blocks - 1)
        oldest = max(0, iteration - self.steps + 1)
        return [Slot(iteration, b, iteration - b) for b in range(newest, oldest - 1, -1)]

    def context_frames(self, block: int) -> int:
        return self.num_cat if block > 0 else 0

    def frame_offset(self, block: int) -> int:
        """Temporal position of the first input frame (context included) of `block`'s window."""
        if self.positions == "local":
            return 0
        return block * self.block_frames - self.context_frames(block)

    @classmethod
    def create(cls, **kwargs: Any) -> DualParalConfig:
        """Like the constructor, but a bad value is one ConfigError line (for CLIs and launchers)."""
        from pydantic import ValidationError

        try:
            return cls(**kwargs)
        except ValidationError as exc:
            msgs = [f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}".lstrip(": ")
                    for e in exc.errors()]
            raise ConfigError("dualparal: " + "; ".join(msgs)) from None


@dataclass(frozen=True)
class Slot:
    """One unit of pipeline work: block `block` takes its step `step` during `iteration`."""

    iteration: int
    block: int
    step: int


def stage_layers(depth: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous [start, end) of the DiT blocks owned by `rank`; the first depth % world_size ranks get one
    more (rank 0 also embeds and the last rank also runs the head, so the extras go to the front)."""
    if world_size > depth:
        raise ConfigError(f"dualparal: world_size={world_size} ranks cannot share depth={depth} DiT blocks "
                          f"(each pipeline stage needs at least one block)")
    base, extra = divmod(depth, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def block_noise(cfg: DualParalConfig, block: int, template: torch.Tensor) -> torch.Tensor:
    """Initial noise of `block` [N, C, B, H, W]; `template` is `noise_template(...)` (coordinated) or unused."""
    if cfg.noise == "independent":
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + block)
        return torch.randn(template.shape, generator=gen).to(template.device)
    if block == 0:
        return template.clone()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + block)
    perm = torch.randperm(template.shape[2], generator=gen).to(template.device)
    return template[:, :, perm].clone()                                        # [N, C, B, H, W]


def noise_template(cfg: DualParalConfig, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """The seeded template [N, C, B, H, W] (CPU generator: the same on every rank and device)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.randn(shape, generator=gen).to(device)


# ----------------------------------------------------------------------------------------------------
# The parallel twin of Attention: neighbour K/V in, own first frames' K/V out
# ----------------------------------------------------------------------------------------------------

class NeighbourKVAttention(nn.Module):
    """Wraps `dit.Attention` (swapped in with setattr, original kept as `.attn`).

    With no state set it computes exactly `attn(x)`. `extra_kv` (k, v) [N, H, Te, Dh] is appended to this
    call's keys/values (queries and outputs keep the input's tokens); `keep = (a, b)` stores this call's
    K/V of tokens a:b in `kept` (cloned, so the full K/V is not held alive).
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn
        self.extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.keep: tuple[int, int] | None = None
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.project_qkv(x)                                        # 3 x [N, H, T, Dh]
        if self.keep is not None:
            a, b = self.keep
            self.kept = (k[:, :, a:b].clone(), v[:, :, a:b].clone())              # 2 x [N, H, b-a, Dh]
        if self.extra_kv is not None:
            k = torch.cat([k, self.extra_kv[0]], dim=2)                           # [N, H, T+Te, Dh]
            v = torch.cat([v, self.extra_kv[1]], dim=2)                           # [N, H, T+Te, Dh]
        return self.attn.project_out(self.attn.attend(q, k, v))                   # [N, T, D]


def install_twins(model: nn.Module, start: int = 0, end: int | None = None) -> list[NeighbourKVAttention]:
    """Swap `blocks[start:end].attn` for NeighbourKVAttention twins (idempotent); returns them in order."""
    twins = []
    for block in model.blocks[start:end]:
        if not isinstance(block.attn, NeighbourKVAttention):
            block.attn = NeighbourKVAttention(block.attn)
        twins.append(block.attn)
    return twins


def remove_twins(model: nn.Module) -> nn.Module:
    """Undo `install_twins` (the plain model again)."""
    for block in model.blocks:
        if isinstance(getattr(block, "attn", None), NeighbourKVAttention):
            block.attn = block.attn.attn
    return model


def keep_only_stage(model: nn.Module, start: int, end: int) -> nn.Module:
    """Free the DiT blocks this rank does not run (replaced by Identity); embedder and head are small and
    kept. Mutates `model`: call it only on a model this rank loaded for itself."""
    for i in range(len(model.blocks)):
        if not start <= i < end:
            model.blocks[i] = nn.Identity()
    return model


def _conditioning(model: nn.Module, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """c [N, D] exactly as VideoDiT.embed computes it (eval mode: no label dropout)."""
    return model.t_embedder(t) + model.y_embedder(y, False)


class PipelineStage:
    """DiT blocks [start, end) of one rank, with the neighbour K/V cache of each of its attention layers."""

    def __init__(self, model: nn.Module, start: int, end: int):
        self.model, self.start, self.end = model, start, end
        self.twins = install_twins(model, start, end)
        self.cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.twins)

    def reset(self) -> None:
        """Start of an iteration: no neighbour is in flight yet."""
        self.cache = [None] * len(self.twins)

    def forward(self, tokens: torch.Tensor, c: torch.Tensor, keep: tuple[int, int] | None,
                use_cache: bool) -> torch.Tensor:
        """tokens [N, L, D] through this stage; `use_cache`: append the cached neighbour K/V at each layer;
        `keep`: token range whose K/V becomes the cache for the next slot (None: cache nothing)."""
        for i, block in enumerate(self.model.blocks[self.start:self.end]):
            twin = self.twins[i]
            twin.extra_kv = self.cache[i] if use_cache else None
            twin.keep = keep
            try:
                tokens = block(tokens, c)                                         # [N, L, D]
            finally:
                self.cache[i] = twin.kept
                twin.extra_kv, twin.keep, twin.kept = None, None, None
        return tokens

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.cache if kv is not None for t in kv)


# ----------------------------------------------------------------------------------------------------
# Memory probe
# ----------------------------------------------------------------------------------------------------

class LiveTensorBytes:
    """Peak bytes of all live tensors of this process (unique storages), sampled where `__call__` is hit.

    A CPU stand-in for the CUDA allocator's peak: Python's tracemalloc does not see torch's allocator. It
    walks the GC's objects (tens of ms), so it is opt-in; `baseline` (e.g. the parameters) is subtracted
    by the caller, not here. On CUDA use torch.cuda.max_memory_allocated instead.
    """

    def __init__(self) -> None:
        self.peak = 0
        self.samples = 0

    @staticmethod
    def current() -> int:
        seen: dict[int, int] = {}
        with warnings.catch_warnings():        # isinstance() on deprecated torch objects warns
            warnings.simplefilter("ignore")
            objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        for obj in objs:
            if obj.device.type != "cpu":
                continue
            try:
                st = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):   # sparse / meta / wrapper tensors
                continue
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return sum(seen.values())

    def __call__(self) -> None:
        self.peak = max(self.peak, self.current())
        self.samples += 1


# ----------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------

@dataclass
class _BlockState:
    """A block in flight on rank 0: its latents (fp32) and its own step index."""

    x: torch.Tensor            # [N, C, B, H, W]
    step: int = 0


@dataclass
class PipelineStats:
    """What one rank measured during `DualParal.generate`."""

    rank: int
    world_size: int
    layers: tuple[int, int]
    latency_s: float = 0.0
    wait_s: float = 0.0                  # time blocked in recv (pipeline bubbles + communication)
    slots: int = 0
    iterations: int = 0
    max_blocks_in_flight: int = 0
    bytes_per_iteration: list[int] = field(default_factory=list)   # bytes this rank sent, per iteration
    comm: dict[str, Any] = field(default_factory=dict)


class DualParal:
    """Block-wise long-video sampler over a ring pipeline; world size 1 is the single-device reference.

    Every rank of the group constructs one (same `cfg`, same weights) and calls `generate`. The `model`
    (a VideoDiT in eval mode) gets NeighbourKVAttention twins on this rank's blocks.
    """

    def __init__(self, model: nn.Module, cfg: DualParalConfig, comm: Comm | None = None):
        self.model, self.cfg = model, cfg
        self.comm = comm or Comm(next(model.parameters()).device)
        self.rank, self.world = self.comm.rank, self.comm.world_size
        self.device = self.comm.device
        self.dtype = next(model.parameters()).dtype
        start, end = stage_layers(len(model.blocks), self.world, self.rank)
        self.stage = PipelineStage(model, start, end)
        self.first, self.last = self.rank == 0, self.rank == self.world - 1
        self.tokens_per_frame = model.num_patches
        self.ts = timesteps(cfg.steps).tolist()
        self._inflight: deque[tuple[Any, torch.Tensor, int]] = deque()
        self.stats = PipelineStats(self.rank, self.world, (start, end))

    # --- communication (through Comm, which counts every byte sent) ---
    # gloo's isend handles report completion only once waited on, so finished sends must be waited for
    # explicitly; a wait must never block on a rank that is itself waiting (deadlock). Rule:
    # - hidden states (rank r -> r+1): at most two in flight; waiting on the older one only needs rank r+1
    #   to reach its recv, and rank r+1 only ever blocks on rank r's earlier sends or its own such waits;
    # - velocities (last rank -> rank 0): rank 0 receives every velocity of iteration k-2 before it sends
    #   anything of iteration k, so once the last rank holds hidden states of iteration k, waiting on its
    #   velocity sends of iterations <= k-2 returns at once.
    # What is in flight is thus bounded by the schedule (<= 2 hidden buffers, <= 2 iterations of
    # velocities), never by the video length.
    def _isend(self, tensor: torch.Tensor, dst: int, layer_type: str, iteration: int) -> None:
        tensor = tensor.contiguous()
        self._inflight.append((self.comm.isend(tensor, dst, layer_type), tensor, iteration))
        if not self.last:
            while len(self._inflight) > 2:
                self._inflight.popleft()[0].wait()

    def _reap_velocity_sends(self, iteration: int) -> None:
        while self._inflight and self._inflight[0][2] <= iteration - 2:
            self._inflight.popleft()[0].wait()

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, layer_type: str) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        t0 = time.perf_counter()
        self.comm.recv(buf, src, layer_type)   # no device sync: on NCCL later kernels are ordered after it
        self.stats.wait_s += time.perf_counter() - t0   # host time blocked (what the pipeline waits on CPU)
        return buf

    def _flush_sends(self) -> None:
        while self._inflight:
            self._inflight.popleft()[0].wait()

    # --- model pieces ---
    def _batch(self, x: torch.Tensor | None, t: float, y: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """CFG doubles the batch: [cond; null]."""
        n = y.shape[0]
        tt = torch.full((n,), float(t), dtype=torch.float32, device=self.device)
        if self.cfg.cfg_scale == 1.0:
            return x, tt, y
        null = torch.full_like(y, self.model.num_classes)
        return (None if x is None else torch.cat([x, x])), torch.cat([tt, tt]), torch.cat([y, null])

    def _velocity(self, tokens: torch.Tensor, c: torch.Tensor, ctx: int) -> torch.Tensor:
        """Last rank: head on the block's own tokens (context outputs discarded) -> fp32 v [N, C, B, H, W]."""
        own = tokens[:, ctx * self.tokens_per_frame:]                             # [N', B*T, D]
        v = self.model.head(own, c).float()                                       # [N', C, B, H, W]
        if self.cfg.cfg_scale == 1.0:
            return v
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + self.cfg.cfg_scale * (v_cond - v_uncond)

    # --- rank 0: block states ---
    def _apply(self, slot: Slot, v: torch.Tensor, sink: BlockSink | None) -> None:
        st = self._blocks[slot.block]
        if st.step != slot.step:
            raise RuntimeError(f"dualparal: block {slot.block} is at step {st.step}, velocity is for step "
                               f"{slot.step} (pipeline out of order)")
        st.x = euler_step(st.x, v, self.ts[st.step], self.ts[st.step + 1])       # [N, C, B, H, W] fp32
        st.step += 1
        if st.step == self.cfg.steps:                                             # finished: it leaves
            del self._blocks[slot.block]
            self._tails.pop(slot.block - 1, None)                                 # its last reader was it
            if self.cfg.num_cat:
                self._tails[slot.block] = st.x[:, :, -self.cfg.num_cat:].clone()
            if sink is not None:
                sink(slot.block, st.x)

    def _context(self, block: int) -> torch.Tensor | None:
        if block == 0 or self.cfg.num_cat == 0:
            return None
        prev = self._blocks.get(block - 1)
        if prev is not None:
            return prev.x[:, :, -self.cfg.num_cat:]
        return self._tails[block - 1]

    def _drain(self, until: Callable[[Slot], bool] | None, sink: BlockSink | None, v_shape: tuple[int, ...]) -> None:
        """Receive and apply pending velocities (FIFO) while `until(pending slot)` holds (None: all)."""
        while self._pending and (until is None or any(until(p) for p in self._pending)):
            slot = self._pending.popleft()
            self._apply(slot, self._recv(v_shape, torch.float32, self.world - 1, "dualparal_velocity"), sink)

    # --- the loop ---
    @torch.no_grad()
    def generate(self, y: torch.Tensor, sink: BlockSink | None = None, collect: bool = True,
                 probe: Callable[[], None] | None = None,
                 on_iteration: Callable[[int], None] | None = None) -> torch.Tensor | None:
        """Run the whole schedule; rank 0 returns the video [N, C, num_frames, H, W] (fp32) when `collect`,
        every other rank None. `sink(block, frames)` sees each finished block on rank 0 (streaming);
        `probe()` is called after every slot (memory sampling); `on_iteration(k)` after iteration k."""
        cfg, m = self.cfg, self.model
        self.stats = PipelineStats(self.rank, self.world, (self.stage.start, self.stage.end))
        n = y.shape[0]
        y = y.to(self.device)
        c_in, size = m.in_channels, m.input_size
        v_shape = (n, c_in, cfg.block_frames, size, size)
        cfg_batch = n * (1 if cfg.cfg_scale == 1.0 else 2)
        self._blocks: dict[int, _BlockState] = {}
        self._tails: dict[int, torch.Tensor] = {}
        self._pending: deque[Slot] = deque()
        out: dict[int, torch.Tensor] = {}

        def emit(block: int, frames: torch.Tensor) -> None:
            if collect:
                out[block] = frames.cpu()
            if sink is not None:
                sink(block, frames)

        template = noise_template(cfg, v_shape, self.device) if self.first else None
        t_start = time.perf_counter()
        for k in range(cfg.num_iterations):
            self.comm.step = k
            self.stage.reset()
            slots = cfg.slots(k)
            if self.first:
                self._drain(lambda p, k=k: p.iteration <= k - 2, emit, v_shape)   # see _isend
                if k < cfg.num_blocks:
                    self._blocks[k] = _BlockState(block_noise(cfg, k, template).float())
            for i, slot in enumerate(slots):
                b, ctx = slot.block, cfg.context_frames(slot.block)
                t = self.ts[slot.step]
                if self.first:
                    # inputs of slot (k, b) = state after iteration k-1 of blocks b and b-1
                    self._drain(lambda p, b=b, k=k: p.iteration < k and p.block in (b, b - 1), emit, v_shape)
                    x = self._blocks[b].x
                    before = self._context(b)
                    window = x if before is None else torch.cat([before, x], dim=2)   # [N, C, ctx+B, H, W]
                    xb, tt, yy = self._batch(window.to(self.dtype), t, y)
                    tokens, c = m.embed(xb, tt, yy, frame_offset=cfg.frame_offset(b))  # [N', L, D], [N', D]
                else:
                    _, tt, yy = self._batch(None, t, y)
                    c = _conditioning(m, tt, yy)                                  # [N', D]
                    length = (ctx + cfg.block_frames) * self.tokens_per_frame
                    tokens = self._recv((cfg_batch, length, m.hidden_size), self.dtype, self.rank - 1,
                                         "dualparal_hidden")
                    if self.last and i == 0:
                        self._reap_velocity_sends(k)
                keep = None
                if cfg.kv_cache and cfg.num_cat:
                    keep = (ctx * self.tokens_per_frame, (ctx + cfg.num_cat) * self.tokens_per_frame)
                tokens = self.stage.forward(tokens, c, keep, use_cache=cfg.kv_cache and i > 0)
                if self.last:
                    v = self._velocity(tokens, c, ctx)                            # [N, C, B, H, W] fp32
                    if self.first:
                        self._apply(slot, v, emit)
                    else:
                        self._isend(v, 0, "dualparal_velocity", k)
                else:
                    self._isend(tokens, self.rank + 1, "dualparal_hidden", k)
                if self.first and not self.last:
                    self._pending.append(slot)
                self.stats.slots += 1
                if probe is not None:
                    probe()
            if self.first:
                self.stats.max_blocks_in_flight = max(self.stats.max_blocks_in_flight, len(slots))
            if on_iteration is not None:
                on_iteration(k)
        if self.first:
            self._drain(None, emit, v_shape)
            if self._blocks:
                raise RuntimeError(f"dualparal: blocks {sorted(self._blocks)} unfinished after the schedule")
        self._flush_sends()
        self.comm.sync()                 # once per run, for the latency; never per layer
        self.stats.latency_s = time.perf_counter() - t_start
        self.stats.iterations = cfg.num_iterations
        self.stats.comm = self.comm.stats.as_dict()
        by_step = self.comm.stats.by_step
        self.stats.bytes_per_iteration = [int(by_step.get(k, 0)) for k in range(cfg.num_iterations)]
        self._tails.clear()
        if not (self.first and collect):
            return None
        return torch.cat([out[b] for b in sorted(out)], dim=2)[:, :, :cfg.num_frames]    # [N, C, F, H, W]


# ----------------------------------------------------------------------------------------------------
# Baseline (its metrics live in archipelago/eval/video.py)
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def naive_blockwise(model: nn.Module, cfg: DualParalConfig, y: torch.Tensor) -> torch.Tensor:
    """Baseline: every block sampled on its own (independent seeded noise, positions 0..B-1, no context,
    no neighbour K/V), then concatenated -> [N, C, num_frames, H, W] fp32."""
    n, dev = y.shape[0], next(model.parameters()).device
    shape = (n, model.in_channels, cfg.block_frames, model.input_size, model.input_size)
    blocks = []
    for b in range(cfg.num_blocks):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + b)
        noise = torch.randn(shape, generator=gen).to(dev)
        blocks.append(sample(model, noise, y.to(dev), steps=cfg.steps, cfg_scale=cfg.cfg_scale,
                             null_class=model.num_classes).cpu())
    return torch.cat(blocks, dim=2)[:, :, :cfg.num_frames]


__all__ = ["DualParal", "DualParalConfig", "LiveTensorBytes", "NeighbourKVAttention", "PipelineStage",
           "PipelineStats", "Slot", "block_noise", "install_twins", "keep_only_stage",
           "naive_blockwise", "noise_template", "remove_twins", "stage_layers"]
