"""`ParallelConfig`: the one validated layout object of parallel inference (mode, degrees, staleness).

It is plain data: building one never starts a process group; `comm.build_groups` does that from it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from archipelago.config import Mode
from archipelago.errors import ConfigError

PATCH_MODES: frozenset[Mode] = frozenset({Mode.naive_patch, Mode.sync_patch, Mode.distrifusion})
SEQUENCE_MODES: frozenset[Mode] = frozenset({Mode.ulysses, Mode.ring, Mode.usp})
# Modes that may put the CFG branches on separate rank groups through cfg_degree (the degrees multiply).
CFG_HYBRID_MODES: frozenset[Mode] = SEQUENCE_MODES | {Mode.pipefusion}
DEGREES: tuple[str, ...] = ("ulysses_degree", "ring_degree", "pipe_degree", "patch_degree", "cfg_degree",
                            "expert_degree")


class ParallelConfig(BaseModel):
    """Layout of ranks for one parallel sampling run; the product of degrees equals `world_size`.

    Ranks form a grid ``cfg_degree x inner`` with the *inner* dimension (patch or expert) fastest:
    ``rank = cfg_idx * inner_degree + inner_idx``. The chatty per-layer patch exchange therefore stays
    among neighbouring ranks (one node, NVLink), while the CFG exchange (one velocity per step) may cross
    nodes.

    Worked example, 8 ranks, ``mode=cfg_parallel, cfg_degree=2, patch_degree=4, patch_mode=distrifusion``::

        rank            0    1    2    3  |  4    5    6    7
        cfg branch      cond cond cond cond  uncond (null class) ...
        token rows      0/4  1/4  2/4  3/4|  0/4  1/4  2/4  3/4      (quarter of the latent rows each)
        patch groups    [0, 1, 2, 3]  [4, 5, 6, 7]    (K/V exchange, every attention layer)
        cfg groups      [0, 4]  [1, 5]  [2, 6]  [3, 7] (one all-gather of the velocity per evaluation)

    Sequence parallel (``ulysses | ring | usp``) and PipeFusion take ``cfg_degree`` directly (xDiT's rule:
    the degrees multiply to the world size). 8 ranks, ``mode=usp, cfg_degree=2, ulysses_degree=2,
    ring_degree=2``: inner group [0, 1, 2, 3] holds the conditional branch, its token chunks 0..3 on ranks
    0..3; Ulysses groups (fastest) [0, 1] [2, 3] [4, 5] [6, 7] re-shard heads <-> tokens by all-to-all,
    ring groups [0, 2] [1, 3] [4, 6] [5, 7] pass K/V round. ``mode=pipefusion, pipe_degree=4`` runs blocks
    in 4 stages (rank i: stage i) with ``pipe_patches`` row patches flowing through them.

    With ``mode=expert_parallel, expert_degree=2`` and 4 experts, rank 0 holds experts 0 and 2, rank 1
    holds experts 1 and 3 (round robin), and one all-reduce per evaluation sums the routed velocities.
    Degrees left unset are inferred from the mode and `world_size`; a set degree that does not fit raises.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    mode: Mode = Field(Mode.single, description="Parallel mode (see Mode).")
    world_size: int = Field(1, ge=1, description="Number of ranks taking part.")
    patch_degree: int | None = Field(
        None, ge=1, description="Row patches per image (patch modes; cfg_parallel's inner dimension).")
    cfg_degree: int | None = Field(None, ge=1, le=2, description="CFG branches on separate ranks (1 or 2).")
    expert_degree: int | None = Field(None, ge=1, description="Ranks sharing the experts (expert_parallel).")
    ulysses_degree: int | None = Field(None, ge=1, description="Ranks splitting the attention heads by "
                                       "all-to-all (ulysses, usp).")
    ring_degree: int | None = Field(None, ge=1, description="Ranks passing K/V blocks round a ring (ring, usp).")
    pipe_degree: int | None = Field(None, ge=1, description="PipeFusion: layer stages, one per rank.")
    pipe_patches: int | None = Field(None, ge=1, description="PipeFusion: patches (token bands) per image that "
                                     "flow through the stages; default pipe_degree.")
    patch_mode: Literal["naive_patch", "sync_patch", "distrifusion"] = Field(
        "sync_patch", description="Patch scheme inside each CFG branch (cfg_parallel with patch_degree > 1).")
    warmup_steps: int = Field(
        1, ge=0, description="DistriFusion / PipeFusion: sampler steps with exact K/V before switching to "
        "stale K/V (PipeFusion needs at least 1: the warm-up fills its K/V buffers).")
    split: Literal["rows"] = Field("rows", description="How the latent is cut into patches: token rows.")
    comm_group_layers: int = Field(
        1, ge=1, description="DistriFusion: attention layers whose async K/V all-gathers are batched.")

    @model_validator(mode="before")
    @classmethod
    def _infer_degrees(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        try:
            mode = Mode(data.get("mode", Mode.single))
        except ValueError:
            return data   # the field validator reports it, with the allowed values
        world = data.get("world_size", 1)
        if not isinstance(world, int) or world < 1:
            return data
        unset = [k for k in DEGREES if data.get(k) is None]
        if mode in CFG_HYBRID_MODES:
            _infer_inner_degrees(mode, world, data, unset)
        elif mode is Mode.cfg_parallel:
            if "cfg_degree" in unset:
                data["cfg_degree"] = 2
            if "patch_degree" in unset and data["cfg_degree"]:
                data["patch_degree"] = max(world // data["cfg_degree"], 1)
        elif mode in PATCH_MODES and "patch_degree" in unset:
            data["patch_degree"] = world
        elif mode is Mode.expert_parallel and "expert_degree" in unset:
            data["expert_degree"] = world
        for key in DEGREES:
            if data.get(key) is None:
                data[key] = 1
        return data

    @model_validator(mode="after")
    def _check_layout(self) -> ParallelConfig:
        degrees = " x ".join(f"{k}={getattr(self, k)}" for k in DEGREES)
        product = math.prod(getattr(self, k) for k in DEGREES)
        if product != self.world_size:
            raise ValueError(f"mode={self.mode.value}: the product of degrees must equal world_size: "
                             f"{degrees} = {product} != world_size={self.world_size}")
        if self.mode is Mode.single and self.world_size != 1:
            raise ValueError(f"mode=single runs on one rank, got world_size={self.world_size} ({degrees})")
        if self.mode in PATCH_MODES and (self.cfg_degree != 1 or self.expert_degree != 1):
            raise ValueError(f"mode={self.mode.value} uses patch_degree only ({degrees}); for CFG "
                             f"branches on separate ranks use mode=cfg_parallel with "
                             f"patch_mode={self.mode.value}")
        own = {Mode.ulysses: {"ulysses_degree"}, Mode.ring: {"ring_degree"},
               Mode.usp: {"ulysses_degree", "ring_degree"}, Mode.pipefusion: {"pipe_degree"},
               Mode.cfg_parallel: {"patch_degree"}, Mode.expert_parallel: {"expert_degree"}}
        allowed = own.get(self.mode, {"patch_degree"}) | ({"cfg_degree"} if self.mode in CFG_HYBRID_MODES else set())
        if self.mode is Mode.cfg_parallel and (self.cfg_degree != 2 or self.expert_degree != 1):
            raise ValueError(f"mode=cfg_parallel needs cfg_degree=2 and expert_degree=1 ({degrees})")
        if self.mode is Mode.expert_parallel and (self.patch_degree != 1 or self.cfg_degree != 1):
            raise ValueError(f"mode=expert_parallel uses expert_degree only ({degrees})")
        stray = [k for k in DEGREES if k not in allowed | {"cfg_degree"} and getattr(self, k) != 1]
        if self.mode is not Mode.single and stray:
            raise ValueError(f"mode={self.mode.value} does not use {', '.join(stray)} ({degrees}); it uses "
                             f"{', '.join(k for k in DEGREES if k in allowed)}")
        if self.mode is Mode.pipefusion and self.warmup_steps < 1:
            raise ValueError("mode=pipefusion needs warmup_steps >= 1 (the synchronous warm-up fills the stale "
                             "K/V buffers of every stage)")
        return self

    # --- layout (pure functions of the config; no process group is touched) ---
    @property
    def inner_degree(self) -> int:
        """Size of the fastest rank dimension: the ranks sharing one image (patch, sequence or pipeline
        degree), or the expert degree for expert_parallel."""
        if self.mode is Mode.expert_parallel:
            return self.expert_degree
        return self.patch_degree * self.ulysses_degree * self.ring_degree * self.pipe_degree

    @property
    def num_pipe_patches(self) -> int:
        """PipeFusion: patches per image after the warm-up."""
        return self.pipe_patches or self.pipe_degree

    @property
    def patch_scheme(self) -> Mode | None:
        """The patch scheme applied inside each branch, or None when images are not split."""
        if self.mode in PATCH_MODES:
            return self.mode
        if self.mode is Mode.cfg_parallel and self.patch_degree > 1:
            return Mode(self.patch_mode)
        return None

    def coords(self, rank: int) -> tuple[int, int]:
        """rank -> (cfg_idx, inner_idx)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world_size={self.world_size}")
        return divmod(rank, self.inner_degree)

    def inner_groups(self) -> list[list[int]]:
        """Ranks sharing one image (patch groups) or one ensemble (expert groups), per CFG branch."""
        d = self.inner_degree
        return [list(range(c * d, (c + 1) * d)) for c in range(self.cfg_degree)]

    def cfg_groups(self) -> list[list[int]]:
        """Ranks holding the same patch (or expert shard) of the conditional and unconditional branch."""
        d = self.inner_degree
        return [[c * d + i for c in range(self.cfg_degree)] for i in range(d)]

    def ulysses_groups(self) -> list[list[int]]:
        """Ranks re-sharding heads <-> tokens together (the fastest dimension inside an inner group)."""
        u, r = self.ulysses_degree, self.ring_degree
        return [[g[j * u + i] for i in range(u)] for g in self.inner_groups() for j in range(r)]

    def ring_groups(self) -> list[list[int]]:
        """Ranks passing K/V round one ring (same Ulysses index, inside an inner group)."""
        u, r = self.ulysses_degree, self.ring_degree
        return [[g[j * u + i] for j in range(r)] for g in self.inner_groups() for i in range(u)]

    def describe(self) -> str:
        text = f"{self.mode.value} world={self.world_size}"
        if self.mode in SEQUENCE_MODES:
            text += f" ulysses={self.ulysses_degree} ring={self.ring_degree} cfg={self.cfg_degree}"
        elif self.mode is Mode.pipefusion:
            text += (f" stages={self.pipe_degree} patches={self.num_pipe_patches} cfg={self.cfg_degree} "
                     f"warmup={self.warmup_steps}")
        else:
            text += f" patch={self.patch_degree} cfg={self.cfg_degree} expert={self.expert_degree}"
        if self.patch_scheme is Mode.distrifusion:
            text += f" warmup={self.warmup_steps} group={self.comm_group_layers}"
        return text

    @classmethod
    def from_inference(cls, inference: Any) -> ParallelConfig:
        """The layout the YAML `inference:` section (archipelago.config.InferenceConfig) asks for."""
        hybrid = {k: getattr(inference, k) for k in ("cfg_degree", "ulysses_degree", "ring_degree", "pipe_patches")
                  if inference.mode in CFG_HYBRID_MODES and getattr(inference, k) is not None}
        return cls.create(mode=inference.mode, world_size=1 if inference.mode is Mode.single else inference.world_size,
                          warmup_steps=inference.warmup_steps, patch_mode=inference.patch_mode,
                          comm_group_layers=inference.comm_group_layers, **hybrid)

    @classmethod
    def create(cls, **kwargs: Any) -> ParallelConfig:
        """Like the constructor, but a bad value is one ConfigError line (for CLIs and launchers)."""
        from pydantic import ValidationError

        try:
            return cls(**kwargs)
        except ValidationError as exc:
            msgs = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                msgs.append(f"{loc}: {msg}" if loc else msg)
            raise ConfigError("parallel config: " + "; ".join(msgs)) from None


def _infer_inner_degrees(mode: Mode, world: int, data: dict[str, Any], unset: list[str]) -> None:
    """Sequence modes and PipeFusion: cfg_degree defaults to 1, the mode's own degrees take the rest of the
    ranks. usp with neither degree set: Ulysses 2 (when the inner group is even) x ring the rest. A degree
    that does not divide is left for the product check, which prints every degree."""
    if "cfg_degree" in unset:
        data["cfg_degree"] = 1
    cfg = data["cfg_degree"] if isinstance(data["cfg_degree"], int) and data["cfg_degree"] >= 1 else 1
    inner = max(world // cfg, 1)

    def rest(given: Any) -> int:
        return inner // given if isinstance(given, int) and given >= 1 and inner % given == 0 else 1

    if mode is Mode.ulysses and "ulysses_degree" in unset:
        data["ulysses_degree"] = inner
    elif mode is Mode.ring and "ring_degree" in unset:
        data["ring_degree"] = inner
    elif mode is Mode.pipefusion and "pipe_degree" in unset:
        data["pipe_degree"] = inner
    elif mode is Mode.usp:
        if "ulysses_degree" in unset and "ring_degree" in unset:
            data["ulysses_degree"] = 2 if inner % 2 == 0 else 1
            data["ring_degree"] = inner // data["ulysses_degree"]
        elif "ring_degree" in unset:
            data["ring_degree"] = rest(data["ulysses_degree"])
        elif "ulysses_degree" in unset:
            data["ulysses_degree"] = rest(data["ring_degree"])


def check_layout_fits(pcfg: ParallelConfig, model_class: str | None, args: dict[str, Any],
                      sample_shape: Sequence[int] | None = None, where: str = "model") -> None:
    """One ConfigError line when the layout does not fit the model (read from checkpoint metadata, before any
    rank joins a group): rows / tokens / heads / depth not divisible, or a mode the model kind lacks.

    model_class: "DiT" | "VideoDiT" (None: unknown, nothing checked); args: the model's constructor kwargs;
    sample_shape: one sample [C, (F,) H, W] (videos: the frame count lives only here).
    """
    size, patch = args.get("input_size"), args.get("patch_size")
    if model_class not in ("DiT", "VideoDiT") or not isinstance(size, int) or not isinstance(patch, int):
        return
    video = model_class == "VideoDiT"
    rows = size // patch
    frames = int(sample_shape[1]) if video and sample_shape and len(sample_shape) == 4 else 1
    tokens = frames * rows * rows
    mode, layout = pcfg.mode, pcfg.describe()
    if video and mode not in SEQUENCE_MODES | {Mode.single, Mode.cfg_parallel}:
        raise ConfigError(f"{where}: a video expert runs with --parallel ulysses | ring | usp | cfg_parallel, not "
                          f"{mode.value} (DualParal, `archipelago generate-video`, is the long-video path)")
    if video and pcfg.patch_scheme is not None:
        raise ConfigError(f"{where}: a video expert has no row patches; cfg_parallel runs it with "
                          f"patch_degree=1 (world size 2), or use --parallel ulysses | ring | usp")
    if pcfg.patch_scheme is not None and pcfg.patch_degree > 1 and rows % pcfg.patch_degree:
        fits = [d for d in range(1, rows + 1) if rows % d == 0]
        raise ConfigError(f"{where}: patch_degree={pcfg.patch_degree} ({layout}) must divide the {rows} token "
                          f"rows of the latent (input_size {size} / patch_size {patch}); use a patch degree "
                          f"(the world size of a patch mode) in {fits}")
    heads, depth = args.get("num_heads"), args.get("depth")
    if mode in SEQUENCE_MODES:
        if isinstance(heads, int) and heads % pcfg.ulysses_degree:
            raise ConfigError(f"{where}: ulysses_degree={pcfg.ulysses_degree} ({layout}) must divide the "
                              f"{heads} attention heads")
        seq = pcfg.ulysses_degree * pcfg.ring_degree
        if tokens % seq:
            raise ConfigError(f"{where}: ulysses_degree x ring_degree = {seq} ({layout}) must divide the "
                              f"{tokens} tokens of a sample")
    if mode is Mode.pipefusion:
        if isinstance(depth, int) and depth < pcfg.pipe_degree:
            raise ConfigError(f"{where}: pipe_degree={pcfg.pipe_degree} ({layout}) stages cannot share "
                              f"depth={depth} blocks (each stage needs at least one)")
        if rows % pcfg.num_pipe_patches:
            raise ConfigError(f"{where}: pipe_patches={pcfg.num_pipe_patches} ({layout}) must divide the "
                              f"{rows} token rows of the latent")


def experts_for_rank(num_experts: int, expert_degree: int, expert_rank: int) -> list[int]:
    """Round-robin placement of experts on the ranks of an expert group (rank r holds r, r+d, r+2d, ...)."""
    if num_experts < expert_degree:
        raise ConfigError(f"expert_parallel: {num_experts} experts cannot occupy "
                          f"expert_degree={expert_degree} ranks (every rank needs at least one expert)")
    return list(range(expert_rank, num_experts, expert_degree))
