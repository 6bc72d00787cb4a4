"""How good a router is, measured where it matters: per noise level t (it must be accurate near t = 0 and
can only guess the prior near t = 1), calibrated (top-k weights are its probabilities), and *aligned*:
how often a routed sampler would hand a sample to the expert that was trained on it."""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from archipelago.experts.flow import interpolate


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of the top-1 confidence: sum over confidence bins of |accuracy - confidence| x bin weight.

    probs [N, K] (rows sum to 1), labels long [N].
    """
    if probs.shape[0] == 0:
        return float("nan")
    conf, pred = probs.max(dim=1)                                                 # [N], [N]
    correct = (pred == labels).float()                                            # [N]
    edges = torch.linspace(0.0, 1.0, n_bins + 1)
    which = torch.bucketize(conf.clamp(1e-6, 1.0), edges[1:-1], right=False)      # [N] in [0, n_bins)
    ece = torch.zeros(())
    for b in range(n_bins):
        m = which == b
        if m.any():
            ece += m.float().mean() * (correct[m].mean() - conf[m].mean()).abs()
    return float(ece)


def t_bin_edges(t_bins: int) -> list[tuple[float, float]]:
    """[(lo, hi)] splitting [0, 1] into t_bins equal intervals (t = 0 is data, t = 1 is noise)."""
    e = torch.linspace(0.0, 1.0, t_bins + 1).tolist()
    return list(itertools.pairwise(e))


@torch.no_grad()
def _logits(router: nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
            batch: int) -> torch.Tensor:
    """Router logits [N, K] for x_t = (1-t) x0 + t eps, eps from `generator` (drawn on CPU)."""
    dev = next(router.parameters()).device
    out = []
    for i in range(0, x0.shape[0], batch):
        xb, yb, tb = x0[i:i + batch], y[i:i + batch], t[i:i + batch]
        eps = torch.randn(xb.shape, generator=generator)
        xt = interpolate(xb, eps, tb)
        out.append(router(xt.to(dev), tb.to(dev), yb.to(dev)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_router(router: nn.Module, images: torch.Tensor, classes: torch.Tensor, cluster_ids: torch.Tensor,
                    t_bins: int = 5, draws: int = 4, sample_steps: int = 32, seed: int = 0,
                    batch: int = 512) -> dict[str, Any]:
    """Accuracy, ECE and NLL per t-bin on clean samples `images` [N,...] (held out from training) noised
    `draws` times per bin at t uniform within the bin, plus expert-data *alignment*.

    alignment: fraction of (sample, sampler step) pairs, over the Euler grid of `sample_steps` steps
    (t = 1, 1 - 1/steps, ..., 1/steps), where the router's top-1 is the shard the sample came from: how
    often a top-1 sampler started on the noised data point would query that point's own expert.
    soft_alignment: the mean router probability of the true shard over the same pairs (the weight the
    `full` ensemble gives to the right expert). chance: accuracy of always predicting the largest shard.
    """
    was_training = router.training
    router.eval()
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    k = int(getattr(router, "num_experts", int(cluster_ids.max()) + 1))
    rows: list[dict[str, Any]] = []
    all_p, all_lab = [], []
    for lo, hi in t_bin_edges(t_bins):
        x0 = images.repeat(draws, *([1] * (images.dim() - 1)))
        lab = cluster_ids.repeat(draws)
        y = classes.repeat(draws)
        t = lo + (hi - lo) * torch.rand(x0.shape[0], generator=g)
        logits = _logits(router, x0, y, t, g, batch)
        probs = logits.softmax(dim=1)
        rows.append({
            "t_lo": round(lo, 4), "t_hi": round(hi, 4), "n": int(x0.shape[0]),
            "accuracy": float((probs.argmax(1) == lab).float().mean()),
            "ece": expected_calibration_error(probs, lab),
            "nll": float(torch.nn.functional.cross_entropy(logits, lab)),
        })
        all_p.append(probs)
        all_lab.append(lab)
    probs, lab = torch.cat(all_p), torch.cat(all_lab)

    # Alignment on the sampler's own time grid (the router is queried at exactly these t).
    grid = torch.linspace(1.0, 0.0, sample_steps + 1)[:-1]
    hits, soft = 0.0, 0.0
    for t_val in grid.tolist():
        t = torch.full((n,), t_val)
        p = _logits(router, images, classes, t, g, batch).softmax(dim=1)
        hits += float((p.argmax(1) == cluster_ids).float().sum())
        soft += float(p.gather(1, cluster_ids[:, None]).sum())
    counts = torch.bincount(cluster_ids, minlength=k).float()
    router.train(was_training)
    return {
        "t_bins": rows,
        "accuracy": float((probs.argmax(1) == lab).float().mean()),
        "ece": expected_calibration_error(probs, lab),
        "alignment": hits / (n * len(grid)),
        "soft_alignment": soft / (n * len(grid)),
        "chance": float(counts.max() / counts.sum()),
        "eval_samples": n,
        "sample_steps": sample_steps,
    }
