"""A class-conditional Diffusion Transformer (Peebles & Xie) that predicts flow-matching velocity.

Every expert of the ensemble is one of these; it is a plain nn.Module (no distributed imports) so that
training strategies and parallel inference modes are applied from outside, by wrapping its blocks.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from archipelago.errors import ConfigError

if TYPE_CHECKING:
    from archipelago.config import ExpertConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine of token features; x [N,T,D], shift/scale [N,D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------------------
# Embedding layers for timesteps and class labels
# ----------------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> vector: sinusoidal features of 1000*t, then a two-layer MLP.

    Scaling by 1000 puts t on the DDPM index range the sinusoid frequencies were designed for; without it
    the whole [0, 1] interval would sit inside the lowest-frequency period and be barely distinguishable.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, t_scale: float = 1000.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.t_scale = t_scale

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal features [N, dim] of (possibly fractional) scalars t [N]."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]                                   # [N, half]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)               # [N, 2*half]
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)          # [N, dim]
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t * self.t_scale, self.frequency_embedding_size)  # [N, F]
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))                              # [N, D]


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with a learned null class (index num_classes) for classifier-free guidance.

    During training each label is replaced by the null class with probability `dropout_prob`, which is what
    teaches the unconditional velocity used by CFG. The null row always exists so that y == num_classes is
    valid at sampling time even for a model trained with dropout 0.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class: randomly (dropout_prob) or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)                                       # [N, D]


# ----------------------------------------------------------------------------------------------------
# Core DiT model
# ----------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention split into three steps that parallel inference can reuse one by one.

    `forward(x) = project_out(attend(*project_qkv(x)))`. A patch-parallel twin (DistriFusion, sync patch)
    calls `project_qkv` on its local tokens, exchanges K/V, then `attend(q, k_all, v_all)` and `project_out`,
    so it never needs to re-implement the projections or know the weight layout.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N,T,D] -> q, k, v each [N,H,T,Dh]."""
        n, t, _ = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)          # [N, T, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                            # 3 x [N, H, T, Dh]
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product attention; q [N,H,Tq,Dh], k/v [N,H,Tk,Dh] -> [N,H,Tq,Dh]."""
        return F.scaled_dot_product_attention(q, k, v)

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """Merge heads and project; o [N,H,T,Dh] -> [N,T,D]."""
        n, h, t, dh = o.shape
        return self.proj(o.transpose(1, 2).reshape(n, t, h * dh))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project_qkv(x)                                             # 3 x [N, H, T, Dh]
        o = self.attend(q, k, v)                                                  # [N, H, T, Dh]
        return self.project_out(o)                                                # [N, T, D]


class Mlp(nn.Module):
    """Token-wise feed-forward: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))                                    # [N, T, D]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: c gives shift/scale/gate for attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=1))                             # 6 x [N, D]
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # [N, T, D]
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))   # [N, T, D]
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + Linear from tokens to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)                   # 2 x [N, D]
        x = modulate(self.norm_final(x), shift, scale)                            # [N, T, D]
        return self.linear(x)                                                     # [N, T, p*p*C]


class DiTBackbone(nn.Module):
    """What the image DiT and the video DiT share: patch / time / label embedders, the fixed spatial sin-cos
    table, the adaLN-Zero blocks, the final layer and their init. Subclasses define `embed`, `head` and
    `forward` for their input layout; `run_blocks` (a pipeline stage) and `forward_with_cfg` are common."""

    def __init__(self, input_size: int, in_channels: int, patch_size: int, hidden_size: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, num_classes: int = 10, class_dropout: float = 0.1):
        super().__init__()
        _check_dims(input_size, patch_size, hidden_size, num_heads)
        # Constructor kwargs, JSON-serialisable: stored in checkpoint metadata to rebuild the model.
        self.config_dict: dict[str, Any] = {
            "input_size": input_size, "in_channels": in_channels, "patch_size": patch_size,
            "hidden_size": hidden_size, "depth": depth, "num_heads": num_heads, "mlp_ratio": float(mlp_ratio),
            "num_classes": num_classes, "class_dropout": float(class_dropout)}
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2   # tokens per image (per frame for video)

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout)
        # Fixed sin-cos table; a persistent buffer so a checkpoint loaded into a meta-built model restores it.
        self.register_buffer("pos_embed", torch.zeros(1, self.num_patches, hidden_size))
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Every custom init in one place (also the `init_weights` step after `to_empty` on meta models)."""
        init_transformer_weights(self)
        self.pos_embed.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size).unsqueeze(0))

    def run_blocks(self, tokens: torch.Tensor, c: torch.Tensor, start: int = 0,
                   end: int | None = None) -> torch.Tensor:
        """Apply blocks[start:end] (a pipeline stage); tokens [N,T,D] -> [N,T,D]."""
        for block in self.blocks[start:end]:
            tokens = block(tokens, c)                                             # [N, T, D]
        return tokens

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """Guided velocity v_u + s (v_c - v_u); conditional and null branches run as one batch of 2N."""
        null = torch.full_like(y, self.num_classes)
        v = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))     # [2N, ...]
        v_cond, v_uncond = v.chunk(2)                                             # 2 x [N, ...]
        return v_uncond + cfg_scale * (v_cond - v_uncond)                         # [N, ...]


class DiT(DiTBackbone):
    """Class-conditional DiT predicting the rectified-flow velocity v = eps - x0 (no learned sigma).

    The forward pass is split in three public stages so pipelines can cut it between blocks:
    `forward(x, t, y) = head(run_blocks(*embed(x, t, y)), c)`.
    """

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, T, p*p*C] -> images [N, C, H, W]."""
        c, p, h = self.out_channels, self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)                                  # [N, h, w, p, p, C]
        x = torch.einsum("nhwpqc->nchpwq", x)                                     # [N, C, h, p, w, p]
        return x.reshape(x.shape[0], c, h * p, h * p)                             # [N, C, H, W]

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images, times, labels -> (tokens [N,T,D], conditioning c [N,D])."""
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed   # [N, T, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training)                # [N, D]
        return tokens, c

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final layer + unpatchify; tokens [N,T,D] -> v [N,C,H,W]."""
        return self.unpatchify(self.final_layer(tokens, c))                       # [N, C, H, W]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [N,C,H,W], t float [N] in [0,1], y long [N] (num_classes = null) -> v [N,C,H,W]."""
        tokens, c = self.embed(x, t, y)                                           # [N, T, D], [N, D]
        tokens = self.run_blocks(tokens, c)                                       # [N, T, D]
        return self.head(tokens, c)                                               # [N, C, H, W]


def _check_dims(input_size: int, patch_size: int, hidden_size: int, num_heads: int) -> None:
    if input_size % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide input_size={input_size}")
    if hidden_size % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of 4 (2D sin-cos position embedding)")


def init_transformer_weights(model: nn.Module) -> None:
    """Shared by DiT and VideoDiT: xavier Linears, normal(0.02) embedders, zeroed adaLN and final layer.

    Zeroing adaLN makes every block start as the identity (gates are 0) and the final layer makes the
    initial velocity exactly 0, the adaLN-Zero recipe that trains DiTs stably without warm-up tricks.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.x_embedder.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))   # like a Linear over the flattened patch
    nn.init.zeros_(model.x_embedder.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


# ----------------------------------------------------------------------------------------------------
# Sine/cosine positional embeddings (MAE-style, fixed)
# ----------------------------------------------------------------------------------------------------

def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Positions pos [M] (any float values) -> [M, embed_dim] = [sin(pos w), cos(pos w)]."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim={embed_dim} must be even")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega                                                  # [D/2]
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None]                # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()             # [M, D]


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """[grid_size**2, embed_dim], row-major over (row, col): half the channels encode each axis."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")                    # [G, G] each
    emb_cols = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))          # [G*G, D/2]
    emb_rows = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))          # [G*G, D/2]
    return torch.cat([emb_cols, emb_rows], dim=1)                                 # [G*G, D]


# ----------------------------------------------------------------------------------------------------
# Configs: named sizes (the CLI's choices for expert.size) and builders
# ----------------------------------------------------------------------------------------------------

DIT_SIZES: dict[str, dict[str, int]] = {
    "DiT-T": {"hidden_size": 64, "depth": 4, "num_heads": 4},     # 16x16 digits on a laptop CPU
    "DiT-S": {"hidden_size": 128, "depth": 6, "num_heads": 4},    # small images / short videos
    "DiT-B": {"hidden_size": 384, "depth": 12, "num_heads": 6},   # GPU-sized
}


def resolve_dims(expert_cfg: ExpertConfig) -> dict[str, Any]:
    """Architecture kwargs from an ExpertConfig: the named size's dims if `size` is set, else the fields."""
    dims: dict[str, Any] = {
        "patch_size": expert_cfg.patch_size, "hidden_size": expert_cfg.hidden_size, "depth": expert_cfg.depth,
        "num_heads": expert_cfg.num_heads, "mlp_ratio": expert_cfg.mlp_ratio,
        "class_dropout": expert_cfg.class_dropout}
    if expert_cfg.size is not None:
        if expert_cfg.size not in DIT_SIZES:
            raise ConfigError(f"field 'expert.size': unknown size {expert_cfg.size!r}; "
                              f"allowed: {' | '.join(DIT_SIZES)}")
        dims.update(DIT_SIZES[expert_cfg.size])
    return dims


def build_dit(expert_cfg: ExpertConfig, input_size: int, in_channels: int, num_classes: int) -> DiT:
    """The expert DiT for `expert_cfg` (an ExpertConfig) on images [C=in_channels, input_size, input_size]."""
    dims = resolve_dims(expert_cfg)
    try:
        return DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **dims)
    except ValueError as exc:
        raise ConfigError(f"expert model: {exc}") from None


def model_args(model: nn.Module) -> dict[str, Any]:
    """Constructor kwargs of a DiT/VideoDiT (unwrapping DDP `.module` / torch.compile `._orig_mod`)."""
    while not hasattr(model, "config_dict"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"{type(model).__name__} has no config_dict (not a DiT/VideoDiT)")
        model = inner
    return dict(model.config_dict)
