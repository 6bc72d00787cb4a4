"""PipeFusion (Fang et al. 2024, "PipeFusion: patch-level pipeline parallelism for diffusion transformers";
xDiT) for the image DiT: the blocks split into stages, one per rank, and the image into M row patches that
flow through the stages one after another, so the stages work on different patches at the same time.

Only hidden states of one patch cross a stage boundary (point to point, [N, T/M, D]) and the velocity is
broadcast once per evaluation: no K/V ever travels, which is why PipeFusion suits slow links. What makes it
approximate: a patch's attention needs the K/V of the whole image, and a stage has fresh K/V only for the
patches it has already computed in this evaluation. Each attention layer keeps a K/V buffer of the whole
image and overwrites a patch's slice when it computes that patch, so patch m attends to fresh K/V of
patches 0..m and K/V of the previous evaluation (stale) for patches m+1..M-1 (as xDiT's buffer does).

Warm-up: while `step < warmup_steps` the whole image is one patch (a plain layer pipeline, exact), which
also fills every buffer. Unlike xDiT we do not pipeline across sampler steps (a patch of step k+1 entering
stage 0 before step k has left the last stage): every evaluation fills and drains the pipeline (a bubble
of (N-1)/(M+N-1)), so any sampler, CFG and CFG parallel work unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from archipelago.experts.dit import Attention, DiT
from archipelago.inference.comm import Comm, Group
from archipelago.inference.dualparal import keep_only_stage, stage_layers
from archipelago.inference.sequence import unpatchify_tokens


@dataclass
class PipeContext:
    """State shared by the twins of one PipeFusion model: the pipeline group and the patch in flight."""

    comm: Comm
    group: Group                      # the pipeline: member i runs stage i
    num_patches: int                  # M after the warm-up
    warmup_steps: int = 1
    step: int = 0
    band: tuple[int, int] = (0, 0)    # token range [lo, hi) of the patch being computed
    num_tokens: int = 0               # tokens of the whole image

    def patches(self) -> int:
        return 1 if self.step < self.warmup_steps else self.num_patches


class StaleKVAttention(nn.Module):
    """Attention of one patch's queries over a whole-image K/V buffer whose own-patch slice is fresh."""

    def __init__(self, module: Attention, ctx: PipeContext):
        super().__init__()
        self.module = module
        self.ctx = ctx
        self.kv: torch.Tensor | None = None       # [2, N, H, T, Dh]: fresh or from the previous evaluation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, ctx = self.module, self.ctx
        q, k, v = attn.project_qkv(x)                                         # 3 x [N, H, Tp, Dh]
        kv = torch.stack([k, v])                                              # [2, N, H, Tp, Dh]
        lo, hi = ctx.band
        if hi - lo == ctx.num_tokens:                                         # warm-up: the whole image
            self.kv = kv
        else:
            if self.kv is None or self.kv.shape[:3] != kv.shape[:3] or self.kv.shape[3] != ctx.num_tokens:
                raise RuntimeError("pipefusion: no K/V of the whole image for this batch yet (the warm-up "
                                   "steps fill the buffers; a new batch needs warm-up again)")
            self.kv[:, :, :, lo:hi] = kv                                      # own patch fresh, others stale
        return attn.project_out(attn.attend(q, self.kv[0], self.kv[1]))      # [N, Tp, D]


class PipeFusionDiT(nn.Module):
    """A DiT run as a patch pipeline over the ranks of a pipeline group; forward returns the full velocity.

    Stage 0 embeds the image and feeds its row patches one by one; each stage receives a patch's hidden
    states from the previous stage, runs its blocks and sends them on (asynchronously, so it can start the
    next patch); the last stage applies the final layer, and broadcasts the whole velocity.
    """

    def __init__(self, module: DiT, ctx: PipeContext):
        super().__init__()
        self.start, self.end = stage_layers(len(module.blocks), ctx.group.size, ctx.group.index)
        self.module = keep_only_stage(module, self.start, self.end)   # free the other stages' weights
        self.ctx = ctx
        self.num_classes = module.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                step: int | None = None) -> torch.Tensor:
        ctx, m, g = self.ctx, self.module, self.ctx.group
        if step is None:
            raise ValueError("pipefusion needs the sampler step: call model_fn(x, t, y, step=k)")
        ctx.step = ctx.comm.step = step
        tokens, c = m.embed(x, t, y)                                          # [N, T, D], [N, D]
        n, ctx.num_tokens, d = tokens.shape
        per = ctx.num_tokens // ctx.patches()
        first, last = g.index == 0, g.index == g.size - 1
        sent, outs = [], []
        for i in range(ctx.patches()):
            ctx.band = (i * per, (i + 1) * per)
            if first:
                h = tokens[:, i * per:(i + 1) * per]                          # [N, T/M, D]
            else:
                h = ctx.comm.recv(tokens.new_empty(n, per, d), g.ranks[g.index - 1], "pipe_hidden")
            h = m.run_blocks(h, c, self.start, self.end).contiguous()         # [N, T/M, D]
            if last:
                outs.append(m.final_layer(h, c))                              # [N, T/M, p*p*C]
            else:
                sent.append((ctx.comm.isend(h, g.ranks[g.index + 1], "pipe_hidden"), h))
        for work, _ in sent:
            work.wait()
        p = m.patch_size
        out = torch.cat(outs, dim=1) if last else tokens.new_empty(n, ctx.num_tokens, p * p * m.out_channels)
        out = ctx.comm.broadcast(out, g.ranks[-1], g, "output")               # [N, T, p*p*C]
        return unpatchify_tokens(m, out)                                      # [N, C, H, W]


ROOT_TWINS: dict[type[nn.Module], type[nn.Module]] = {DiT: PipeFusionDiT}
LAYER_TWINS: dict[type[nn.Module], type[nn.Module]] = {Attention: StaleKVAttention}
