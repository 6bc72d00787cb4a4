"""`ParallelConfig`: the one validated layout object of parallel inference (mode, degrees, staleness).

It is plain data: building one never starts a process group; `comm.build_groups` does that from it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from archipelago.config import Mode
from archipelago.errors import ConfigError

PATCH_MODES: frozenset[Mode] = frozenset({Mode.naive_patch, Mode.sync_patch, Mode.distrifusion})


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
    patch_mode: Literal["naive_patch", "sync_patch", "distrifusion"] = Field(
        "sync_patch", description="Patch scheme inside each CFG branch (cfg_parallel with patch_degree > 1).")
    warmup_steps: int = Field(
        1, ge=0, description="DistriFusion: sampler steps with exact K/V before switching to stale K/V.")
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
        unset = [k for k in ("patch_degree", "cfg_degree", "expert_degree") if data.get(k) is None]
        if mode is Mode.cfg_parallel:
            if "cfg_degree" in unset:
                data["cfg_degree"] = 2
            if "patch_degree" in unset and data["cfg_degree"]:
                data["patch_degree"] = max(world // data["cfg_degree"], 1)
        elif mode in PATCH_MODES and "patch_degree" in unset:
            data["patch_degree"] = world
        elif mode is Mode.expert_parallel and "expert_degree" in unset:
            data["expert_degree"] = world
        for key in ("patch_degree", "cfg_degree", "expert_degree"):
            if data.get(key) is None:
                data[key] = 1
        return data

    @model_validator(mode="after")
    def _check_layout(self) -> ParallelConfig:
        degrees = (f"patch_degree={self.patch_degree} x cfg_degree={self.cfg_degree} x "
                   f"expert_degree={self.expert_degree}")
        product = self.patch_degree * self.cfg_degree * self.expert_degree
        if product != self.world_size:
            raise ValueError(f"mode={self.mode.value}: the product of degrees must equal world_size: "
                             f"{degrees} = {product} != world_size={self.world_size}")
        if self.mode is Mode.single and self.world_size != 1:
            raise ValueError(f"mode=single runs on one rank, got world_size={self.world_size} ({degrees})")
        if self.mode in PATCH_MODES and (self.cfg_degree != 1 or self.expert_degree != 1):
            raise ValueError(f"mode={self.mode.value} uses patch_degree only ({degrees}); for CFG "
                             f"branches on separate ranks use mode=cfg_parallel with "
                             f"patch_mode={self.mode.value}")
        if self.mode is Mode.cfg_parallel and (self.cfg_degree != 2 or self.expert_degree != 1):
            raise ValueError(f"mode=cfg_parallel needs cfg_degree=2 and expert_degree=1 ({degrees})")
        if self.mode is Mode.expert_parallel and (self.patch_degree != 1 or self.cfg_degree != 1):
            raise ValueError(f"mode=expert_parallel uses expert_degree only ({degrees})")
        return self

    # --- layout (pure functions of the config; no process group is touched) ---
    @property
    def inner_degree(self) -> int:
        """Size of the fastest rank dimension: patch degree, or expert degree for expert_parallel."""
        return self.expert_degree if self.mode is Mode.expert_parallel else self.patch_degree

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

    def describe(self) -> str:
        text = (f"{self.mode.value} world={self.world_size} patch={self.patch_degree} cfg={self.cfg_degree} "
                f"expert={self.expert_degree}")
        if self.patch_scheme is Mode.distrifusion:
            text += f" warmup={self.warmup_steps} group={self.comm_group_layers}"
        return text

    @classmethod
    def from_inference(cls, inference: Any) -> ParallelConfig:
        """The layout the YAML `inference:` section (archipelago.config.InferenceConfig) asks for."""
        return cls.create(mode=inference.mode, world_size=1 if inference.mode is Mode.single else inference.world_size,
                          warmup_steps=inference.warmup_steps, patch_mode=inference.patch_mode,
                          comm_group_layers=inference.comm_group_layers)

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


def experts_for_rank(num_experts: int, expert_degree: int, expert_rank: int) -> list[int]:
    """Round-robin placement of experts on the ranks of an expert group (rank r holds r, r+d, r+2d, ...)."""
    if num_experts < expert_degree:
        raise ConfigError(f"expert_parallel: {num_experts} experts cannot occupy "
                          f"expert_degree={expert_degree} ranks (every rank needs at least one expert)")
    return list(range(expert_rank, num_experts, expert_degree))
