"""Train the router over all shards: its own job, needing no expert (it runs beside the islands).

    in-process   train_router(cfg, data_url="runs/q/data", out_url="runs/q/router")
    CLI          archipelago train-router --config configs/digits-quickstart.yaml

Each step noises a batch of clean samples from every shard, x_t = (1-t) x0 + t eps, and fits the shard
(cluster) id with cross-entropy. t is drawn *uniformly* on [0, 1], not logit-normal like the experts:
the router is queried at every step of the sampler's uniform t grid, and the ends matter (near t = 1 its
choice commits a top-1 trajectory to one expert; near t = 0 it picks who draws the details), which the
logit-normal would starve. A seeded 10% of the samples is held out for the metrics in meta.json.

Output (written through storage, meta.json last = the commit marker): `router.safetensors` and `meta.json`
{format_version, kind: "router", model: {class, args}, num_experts, data_manifest_sha256, config_hash,
router: RouterConfig, files: {name: sha256}, metrics}. A complete output with the same inputs is reused.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from archipelago import storage
from archipelago.config import ArchipelagoConfig
from archipelago.errors import CheckpointError, LeaseError, StorageError
from archipelago.experts.callbacks import TrainCallback
from archipelago.experts.checkpoint import encode_tensors, read_meta_json
from archipelago.experts.flow import interpolate
from archipelago.experts.reliability import NonFiniteGuard, params_finite
from archipelago.lease import ROUTER, RunLease, fenced_out
from archipelago.router.metrics import evaluate_router
from archipelago.router.model import Router, build_router

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META = "meta.json"
WEIGHTS = "router.safetensors"
HOLDOUT = 0.1


def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine to lr/10 (step is 0-based)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) index tensors: a seeded permutation, HOLDOUT of it held out (at least 1 sample)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_eval = max(1, round(n * HOLDOUT)) if n > 1 else 0
    return perm[n_eval:], perm[:n_eval]


def _identity(cfg: ArchipelagoConfig, manifest_sha: str, class_conditional: bool) -> dict[str, Any]:
    """Everything that determines the router's weights; equal identity -> reuse the existing output."""
    return {"router": cfg.router.model_dump(mode="json"), "data_manifest_sha256": manifest_sha,
            "class_conditional": class_conditional, "sample_steps": cfg.expert.sample_steps,
            "format_version": FORMAT_VERSION}


def train_router(cfg: ArchipelagoConfig, data_url: str, out_url: str, callbacks: Iterable[TrainCallback] = (),
                 class_conditional: bool | None = None, resume: bool = True,
                 device: str | torch.device | None = None, lease_wait_s: float = 0.0) -> dict[str, Any]:
    """Train the router on every shard of `data_url`, write it to `out_url`, return
    {router, steps, final_loss, num_experts, metrics, wall_s, cached}.

    class_conditional: condition on the class label too (the DDM paper's router sees x_t, t and the class);
    with it, label dropout (expert.class_dropout) trains the null class used when no label is given.
    None: `router.class_conditional` of the config (r(x_t, t) when false: the ablation).
    """
    if class_conditional is None:
        class_conditional = cfg.router.class_conditional
    from archipelago.data.shards import load_manifest, manifest_sha256

    t_start = time.perf_counter()
    callbacks = list(callbacks)
    manifest = load_manifest(data_url)
    manifest_sha = manifest_sha256(data_url)
    identity = _identity(cfg, manifest_sha, class_conditional)

    # ---- reuse a finished identical run --------------------------------------------------------------
    if resume:
        done = _finished(out_url, identity)
        if done is not None:
            log.info("%s: router already trained on this data with this config; reusing", out_url)
            result = {"router": out_url, "steps": done["step"], "final_loss": done["final_loss"],
                      "num_experts": done["num_experts"], "metrics": done["metrics"], "wall_s": 0.0,
                      "cached": True}
            for cb in callbacks:
                cb.on_end(result)
            return result

    # ---- one writer: the router's lease on out_url (released however this ends) -----------------------
    with RunLease.acquire(out_url, cfg.expert.lease_ttl_s, f"router ({out_url})", lease_wait_s) as lease:
        return _train(cfg, data_url, out_url, callbacks, class_conditional, device, manifest, manifest_sha,
                      identity, t_start, lease)


def _train(cfg: ArchipelagoConfig, data_url: str, out_url: str, callbacks: list[TrainCallback],
           class_conditional: bool, device: str | torch.device | None, manifest: Any, manifest_sha: str,
           identity: dict[str, Any], t_start: float, lease: RunLease) -> dict[str, Any]:
    from archipelago.data.chunks import router_stream, use_stream
    from archipelago.data.latents import data_space
    from archipelago.data.shards import read_all

    rcfg = cfg.router

    # ---- data: every shard, labels = shard ids; a held-out split for the metrics ---------------------
    #      (chunked shards stream through a shuffle buffer; the held-out split is then by source index)
    k = manifest.num_clusters
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if use_stream(cfg.data.loader, all(s.chunks is not None for s in manifest.shards)):
        stream, held_out = router_stream(data_url, manifest, rcfg.seed, cfg.data.shuffle_buffer, HOLDOUT)

        def next_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x, y, c, _ = stream.next_rows(rcfg.batch_size)
            return x.to(dev), y.to(dev), c.to(dev)
    else:
        images, classes, cluster_ids = read_all(data_url)
        train_idx, eval_idx = _split(images.shape[0], rcfg.seed)
        held_out = (images[eval_idx], classes[eval_idx], cluster_ids[eval_idx])
        x_train, y_train, c_train = (images[train_idx].to(dev), classes[train_idx].to(dev),
                                     cluster_ids[train_idx].to(dev))

        def next_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            idx = torch.randint(x_train.shape[0], (rcfg.batch_size,), generator=g).to(dev)
            return x_train[idx], y_train[idx], c_train[idx]

    # ---- model -----------------------------------------------------------------------------------------
    torch.manual_seed(rcfg.seed)
    num_classes = manifest.num_classes if class_conditional and manifest.num_classes > 1 else 0
    router = build_router(rcfg, manifest.image_shape, k, num_classes=num_classes,
                          class_dropout=cfg.expert.class_dropout)
    router.to(dev).train()
    opt = torch.optim.AdamW(router.parameters(), lr=rcfg.lr, weight_decay=0.0)
    g = torch.Generator(device="cpu").manual_seed(rcfg.seed)

    # ---- loop --------------------------------------------------------------------------------------------
    total, warmup = rcfg.steps, min(20, rcfg.steps // 10)
    log_every = max(1, total // 20)
    info = {"rank": 0, "world_size": 1, "strategy": "single", "start_step": 0, "total_steps": total,
            "out_url": out_url, "config": cfg, "shard": None, "model": router, "ema": None}
    for cb in callbacks:
        cb.on_start(info)
    loss_sum, correct, seen, window, t0 = 0.0, 0.0, 0, 0, time.perf_counter()
    final_loss = float("nan")
    guard = NonFiniteGuard(rcfg.on_nonfinite, rcfg.max_nonfinite_skips, f"router ({out_url})", "router.on_nonfinite")
    for step in range(1, total + 1):
        lr = _lr_at(step - 1, total, rcfg.lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x0, yb, cb = next_batch()                                                  # [B, C, H, W], [B], [B]
        eps = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.rand(x0.shape[0], generator=g).to(dev)                          # uniform, see docstring
        logits = router(interpolate(x0, eps, t), t, yb)                           # [B, K]
        loss = F.cross_entropy(logits.float(), cb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(router.parameters(), float("inf")))
        if not guard.check(step, float(loss.detach()), grad_norm):
            continue                                         # skipped (router.on_nonfinite=skip)
        try:
            opt.step()
        except RuntimeError as exc:   # an LR so large that Adam's step size overflows float32
            if "overflow" not in str(exc):
                raise
            guard.check(step, float(loss.detach()), float("inf"), weights_ok=False)
        loss_sum += float(loss.detach())
        correct += float((logits.argmax(1) == cb).float().sum())
        seen += x0.shape[0]
        window += 1
        if step % log_every == 0 or step == total:
            elapsed = time.perf_counter() - t0
            final_loss = loss_sum / window
            metrics = {"loss": final_loss, "lr": lr, "train_accuracy": correct / seen,
                       "samples_per_s": seen / elapsed, "step_time_s": elapsed / window}
            for cb in callbacks:
                cb.on_step(step, metrics)
            loss_sum, correct, seen, window, t0 = 0.0, 0.0, 0, 0, time.perf_counter()

    # ---- metrics on the held-out split, then the checkpoint (meta.json last) ---------------------------
    guard.check(total, final_loss if window == 0 else loss_sum / window, 0.0,
                weights_ok=params_finite([router]))   # never publish non-finite weights
    router.eval()
    metrics = evaluate_router(router, *held_out,
                              t_bins=rcfg.t_bins, sample_steps=cfg.expert.sample_steps, seed=rcfg.seed + 1)
    metrics["final_loss"] = final_loss
    save_router(router.cpu(), out_url, lease=lease, meta={
        "num_experts": k, "data_manifest_sha256": manifest_sha, "config_hash": cfg.config_hash(),
        "router": rcfg.model_dump(mode="json"), "identity": identity, "step": total,
        "final_loss": final_loss, "metrics": metrics, "image_shape": list(manifest.image_shape),
        "num_classes": manifest.num_classes, "partitioner": manifest.partitioner,
        "data_space": data_space(manifest.latent)})
    for cb in callbacks:
        cb.on_checkpoint(total, out_url)
    result = {"router": out_url, "steps": total, "final_loss": final_loss, "num_experts": k,
              "metrics": metrics, "wall_s": time.perf_counter() - t_start, "cached": False}
    for cb in callbacks:
        cb.on_end(result)
    return result


# ----------------------------------------------------------------------------------------------------
# Checkpoint I/O
# ----------------------------------------------------------------------------------------------------

def save_router(router: Router, out_url: str, meta: dict[str, Any], lease: RunLease | None = None) -> str:
    """Write router.safetensors then meta.json (the commit marker) under out_url; returns out_url. With a
    lease, its fencing token goes into meta.json and a stale attempt (taken over) writes nothing."""
    if lease is not None and (why := lease.fenced()) is not None:
        raise LeaseError(why)
    storage.remove(storage.join(out_url, META))   # a half-rewritten router never looks complete
    blob = encode_tensors(router.state_dict(), "router")
    digest = storage.write_bytes(storage.join(out_url, WEIGHTS), blob)
    full = {**meta, "format_version": FORMAT_VERSION, "kind": "router",
            "model": {"class": "Router", "args": dict(router.config_dict)},
            "num_experts": router.num_experts, "files": {WEIGHTS: digest}, "created_at": time.time(),
            "torch_version": torch.__version__}
    if lease is not None:
        full["fencing_token"] = lease.token
        if (why := lease.fenced()) is not None:
            raise LeaseError(why)
    storage.write_json(storage.join(out_url, META), full)
    return out_url


def read_router_meta(url: str) -> dict[str, Any]:
    """meta.json of a router checkpoint; CheckpointError (one line) if missing, foreign or another version."""
    meta_url = storage.join(url, META)
    meta = read_meta_json(meta_url, "the router was not trained, or its job did not finish")
    if not isinstance(meta, dict) or meta.get("kind") != "router" or "model" not in meta:
        raise CheckpointError(f"{meta_url}: not an Archipelago router checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_url}: router format version {meta.get('format_version')}, this "
                              f"Archipelago reads {FORMAT_VERSION}")
    return meta


def load_router(url: str, device: str | torch.device = "cpu") -> tuple[Router, dict[str, Any]]:
    """(Router in eval mode, meta) from a router checkpoint; the weights' sha256 is checked, never unpickled."""
    from safetensors.torch import load

    meta = read_router_meta(url)
    w_url = storage.join(url, WEIGHTS)
    try:
        data = storage.read_bytes(w_url)
    except StorageError as exc:
        raise CheckpointError(str(exc)) from None
    if storage.sha256_bytes(data) != meta["files"].get(WEIGHTS):
        raise CheckpointError(f"{w_url}: sha256 mismatch with meta.json: truncated or modified")
    try:
        router = Router(**meta["model"]["args"])
        router.load_state_dict(load(data), strict=True)
    except Exception as exc:  # noqa: BLE001 - TypeError (args), RuntimeError (shapes), SafetensorError
        raise CheckpointError(f"{w_url}: does not load into a Router ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160]})") from None
    return router.to(device).eval(), meta


def _finished(out_url: str, identity: dict[str, Any]) -> dict[str, Any] | None:
    """meta of a complete, verified router at out_url trained with the same identity, else None."""
    if not storage.exists(storage.join(out_url, META)):
        return None
    try:
        _, meta = load_router(out_url)
    except CheckpointError as exc:
        log.warning("%s: existing router is not usable (%s); training again", out_url, exc)
        return None
    why = fenced_out(storage.join(out_url, META), meta, where=(out_url, ROUTER))
    if why is not None:
        log.warning("%s; training again", why)
        return None
    return meta if meta.get("identity") == identity else None
