"""FLOP accounting for equal-compute comparisons (DDM vs monolith) and routing-cost reports.

Counted from the architecture (2 FLOPs per multiply-add), not measured: per DiT block and token the
qkv + output projections (4 D^2), attention scores and mixing (2 T D), the MLP (2 r D^2); per block and
sample the adaLN modulation (6 D^2); plus the patch embedding, timestep MLP and final layer. Norms,
softmax and activations are ignored (a few % at these sizes).
"""
from __future__ import annotations

from typing import Any


def dit_forward_flops(args: dict[str, Any]) -> int:
    """Forward FLOPs of one sample through a DiT with constructor kwargs `args` (`model.config_dict`)."""
    d, depth, p, c = args["hidden_size"], args["depth"], args["patch_size"], args["in_channels"]
    tokens = (args["input_size"] // p) ** 2
    mlp = int(args.get("mlp_ratio", 4.0) * d)
    per_token = 4 * d * d + 2 * tokens * d + 2 * mlp * d
    macs = depth * (tokens * per_token + 6 * d * d)
    macs += tokens * p * p * c * d + 256 * d + d * d          # patch embedding, timestep MLP
    macs += tokens * d * p * p * c + 2 * d * d                # final layer + its adaLN
    return 2 * macs


def train_flops(forward_flops: int, batch: int, steps: int) -> int:
    """Training FLOPs: forward + backward ~ 3 x forward, per sample and step."""
    return 3 * forward_flops * batch * steps
