"""Train one expert on one data shard: the island's training function, the same code in three settings.

    in-process       train_expert(cfg, shard=0, data_url="runs/data", out_url="runs/x/expert-000")
    torchrun         torchrun --nproc-per-node 2 -m archipelago.experts.train --config configs/x.yaml \\
                         --shard 0 --data runs/data --out runs/x/expert-000 --set expert.strategy=fsdp2
    multi-node       torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
                         --nproc-per-node 8 -m archipelago.experts.train ...
    Ray Train        the island's train function calls train_expert(...) after Ray has set up the group.

The process group is used if one exists (Ray Train), created from the torchrun environment if
WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU), and otherwise we run as a single process (ddp / fsdp2 /
deepspeed then get a one-rank group of their own). Rank r draws noise,
t and label dropout from seed * world_size + r; the data order is one seeded permutation per epoch split
across ranks (disjoint, like DistributedSampler), computed from the step number so a resumed run needs
no sampler state. Rank 0 writes; every checkpoint ends at a barrier.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from archipelago import storage
from archipelago.config import ArchipelagoConfig, ExpertConfig, island_expert_config
from archipelago.errors import (
    PREEMPTED_EXIT,
    ArchipelagoError,
    CheckpointError,
    ConfigError,
    DataError,
    LeaseError,
    Preempted,
)
from archipelago.experts import checkpoint as ckpt
from archipelago.experts.callbacks import JsonlMetricsCallback, RichProgressCallback, TrainCallback
from archipelago.experts.parallelize import apply_strategy, micro_batch_size, world
from archipelago.experts.precision import autocast, check_precision
from archipelago.experts.reliability import NonFiniteGuard, PreemptionHandler, agree, params_finite
from archipelago.lease import RunLease

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Pieces the loop uses: LR schedule, data order, distributed setup
# ----------------------------------------------------------------------------------------------------

# Under torchrun the gloo group we created must not be destroyed from Python: when DDP's Reducer, its last
# owner, is freed (at train_expert's return) ~ProcessGroupGloo joins its worker thread while this thread holds
# the GIL, and a worker still releasing a tensor made in Python waits for the GIL: both hang (seen under load,
# rank 1 stuck in ~ProcessGroupGloo after rank 0 finished). `_exit` leaves with os._exit right after anyway.
_OWNERS_OF_THE_GROUP: list[Any] = []


def lr_at(step: int, cfg: ExpertConfig) -> float:
    """LR of optimizer step `step` (0-based): linear warm-up to cfg.lr, then cosine to lr * lr_min_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    lr_min = cfg.lr * cfg.lr_min_ratio
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return lr_min + (cfg.lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ShardSampler:
    """Indices of micro-batch i for one rank: each epoch is one permutation of the shard (seed + epoch,
    the same on every rank), cut to a multiple of world_size and dealt rank::world_size, so ranks see
    disjoint samples. A pure function of i: resuming needs only the step number."""

    def __init__(self, n: int, world_size: int, rank: int, seed: int):
        self.n, self.world_size, self.rank, self.seed = n, world_size, rank, seed
        self.per_rank = n // world_size
        if self.per_rank == 0:
            raise DataError(f"shard has {n} samples, fewer than the {world_size} ranks training it")
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    def _rank_perm(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world_size]
            self._perm, self._epoch = perm[self.rank::self.world_size], epoch
        return self._perm

    def indices(self, micro_index: int, micro_batch: int) -> torch.Tensor:
        pos, parts, need = micro_index * micro_batch, [], micro_batch
        while need:
            epoch, off = divmod(pos, self.per_rank)
            take = min(need, self.per_rank - off)
            parts.append(self._rank_perm(epoch)[off:off + take])
            pos, need = pos + take, need - take
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def setup_distributed(strategy: str = "single") -> tuple[bool, torch.device]:
    """Use an existing process group (Ray Train); else create one from torchrun's environment when
    WORLD_SIZE > 1 or a multi-process strategy runs under torchrun with one process; else, for such a
    strategy started in-process, a one-rank group on an in-memory store; else none (single).

    Returns (whether we created the group, so we destroy it; the device of this rank)."""
    created = False
    if dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (strategy != "single" and "MASTER_ADDR" in os.environ):
            dist.init_process_group(backend=backend)
            created = True
        elif strategy != "single":
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
            created = True
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return created, device


def rng_state(noise: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state(), "noise": noise.get_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (obj itself without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


# ----------------------------------------------------------------------------------------------------
# The island training function
# ----------------------------------------------------------------------------------------------------

def train_expert(cfg: ArchipelagoConfig, shard: int, data_url: str, out_url: str,
                 callbacks: Iterable[TrainCallback] = (), resume: bool = True,
                 max_steps: int | None = None, lease_wait_s: float = 0.0) -> dict[str, Any]:
    """Train expert `shard` on `data_url`'s shard, writing checkpoints and metrics.jsonl under `out_url`.

    resume: continue from the newest complete checkpoint under out_url (a finished run with the same
        config returns its result at once, with "cached": True); False deletes out_url's checkpoints
        and starts over.
    max_steps: stop after this step without a final checkpoint (simulates an interruption).
    lease_wait_s: how long to wait for another live writer's lease on out_url to end (0: fail at once
        with one line naming it; Ray restarts of an island wait out a dead holder's ttl).
    callbacks: TrainCallback hooks, called on every rank (a JsonlMetricsCallback writing
        out_url/metrics.jsonl always runs first).
    Returns {final_checkpoint (URL or None), steps, start_step, final_loss, samples_per_s (checkpoint time
    excluded), strategy, world_size, checkpoint_s, wall_s, out_url, shard}.
    """
    from archipelago.data.chunks import ChunkStream, chunk_refs, use_stream
    from archipelago.data.latents import check_data_space, data_space
    from archipelago.data.shards import load_manifest, manifest_sha256, read_shard
    from archipelago.experts.ema import EMA
    from archipelago.experts.flow import flow_matching_loss

    ecfg = cfg.expert
    t_start = time.perf_counter()

    # ---- distributed setup -------------------------------------------------------------------------
    created_group, device = setup_distributed(ecfg.strategy)
    stack = contextlib.ExitStack()
    what = f"expert {shard} ({out_url})"
    # From here a SIGTERM (preemption) is remembered, not fatal: the first step that finishes is checkpointed.
    preempt = stack.enter_context(PreemptionHandler(ecfg.preempt_grace_s, what))
    try:
        rank, world_size = world()
        if ecfg.strategy == "single" and world_size > 1:
            raise ConfigError(f"field 'expert.strategy': 'single' cannot use {world_size} ranks; choose ddp, "
                              f"fsdp2 or deepspeed")
        check_precision(ecfg.precision, device)   # before any data is read
        rank_seed = ecfg.seed * world_size + rank
        callbacks = [JsonlMetricsCallback(storage.join(out_url, "metrics.jsonl")), *callbacks]

        # ---- data: the whole shard on the device, or (chunked shards) a stream of chunks ---------------
        manifest = load_manifest(data_url)
        ecfg = island_expert_config(cfg, manifest.num_clusters)   # this island's share of the budget
        micro = micro_batch_size(ecfg, world_size)
        info = manifest.shards[shard] if 0 <= shard < manifest.num_clusters else None
        if info is not None and use_stream(cfg.data.loader, info.chunks is not None):
            stream = ChunkStream(chunk_refs(data_url, info), rank, world_size, ecfg.seed, cfg.data.shuffle_buffer)

            def micro_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
                x, y, _, _ = stream.batch(i, micro)
                return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        else:
            data = read_shard(data_url, shard, manifest=manifest)
            images, labels = data.images.to(device), data.labels.to(device)
            sampler = ShardSampler(len(data), world_size, rank, ecfg.seed)

            def micro_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
                idx = sampler.indices(i, micro)
                return images[idx], labels[idx]

        # ---- model: identical init on every rank (seed), EMA copied before any wrapping --------------
        torch.manual_seed(ecfg.seed)
        model = _build_model(ecfg, manifest.image_shape, manifest.num_classes)
        ema = EMA(model, ecfg.ema_decay)
        ckpts_meta = {
            "name": cfg.name, "config_hash": cfg.config_hash(), "model": ckpt.model_record(model),
            "shard": shard, "shard_sha256": manifest.shards[shard].sha256,
            "data_manifest_sha256": manifest_sha256(data_url), "image_shape": manifest.image_shape,
            "num_classes": manifest.num_classes, "expert": ecfg.model_dump(mode="json"),
            "flop_match": cfg.islands.flop_match, "num_clusters": manifest.num_clusters,
            "data_space": data_space(manifest.latent)}
        manager = ckpt.CheckpointManager(out_url, keep=ecfg.keep_checkpoints, run_meta=ckpts_meta)

        # ---- resume: a finished run is returned as is; otherwise weights go in before wrapping, so every
        #      strategy shards / partitions the restored weights ------------------------------------------
        resume_url, resume_meta = None, None
        if resume:
            # Rank 0 decides and tells the others, so all ranks resume from the same checkpoint.
            found = None
            if rank == 0:
                finished = _finished(manager, cfg) if max_steps is None else None
                found = (finished, None if finished else manager.latest())
            done, resume_url = _from_rank0(found)
            if done is not None:
                if rank == 0:
                    log.info("%s: already trained (config %s…); nothing to do", out_url, cfg.config_hash()[:12])
                for cb in callbacks[1:]:
                    cb.on_end(done)
                return done
        start_step = 0
        if resume_url is not None:
            resume_meta = ckpt.read_meta(resume_url)
            check_data_space(resume_meta.get("data_space"), ckpts_meta["data_space"],
                             storage.join(resume_url, ckpt.META), "this run's data holds")
            ckpt.check_resumable(resume_meta, resume_url, model, ecfg.strategy, world_size,
                                 ecfg.zero_stage if ecfg.strategy == "deepspeed" else None,
                                 expect={"shard": shard, "shard_sha256": ckpts_meta["shard_sha256"]})
            ckpt.load_weights(model, ckpt.read_tensors(resume_url, ckpt.MODEL, resume_meta), ckpt.MODEL)
            ema.load_state_dict(ckpt.read_tensors(resume_url, ckpt.EMA, resume_meta))
            start_step = int(resume_meta["step"])
            ema.num_updates = start_step                   # one EMA update per optimizer step
            if start_step > ecfg.steps:
                raise CheckpointError(f"{resume_url}: step {start_step} is beyond expert.steps={ecfg.steps}; "
                                      f"raise expert.steps or use another output URL")

        # ---- one writer per run directory: rank 0 takes the lease (its attempt number is the fencing
        #      token in every meta.json), then clears what a killed writer left -----------------------------
        lease_or_error = None
        if rank == 0:
            try:
                # released however the run ends (done, diverged, preempted, failed): a resume takes over at once
                lease = stack.enter_context(RunLease.acquire(out_url, ecfg.lease_ttl_s, what, lease_wait_s))
                manager.lease, lease_or_error = lease, lease.token
                if not resume:   # starting over: an earlier run's checkpoints must not pass for this run's
                    for name in ("checkpoints", "final"):
                        storage.remove(storage.join(out_url, name), recursive=True)
                manager.clean_stale()
            except LeaseError as exc:
                lease_or_error = str(exc)
        lease_or_error = _from_rank0(lease_or_error)
        if isinstance(lease_or_error, str):
            raise LeaseError(lease_or_error)
        if rank == 0 and resume_url is not None:
            log.info("resuming from %s (step %d)", resume_url, start_step)

        # ---- strategy ----------------------------------------------------------------------------------
        wrapped = apply_strategy(model, ecfg, device)
        if created_group and world_size > 1:
            _OWNERS_OF_THE_GROUP.append(wrapped)     # see _OWNERS_OF_THE_GROUP: freed only by os._exit
        ema.to(device)
        torch.manual_seed(rank_seed)                       # label dropout draws from the global RNG
        noise = torch.Generator(device=device).manual_seed(rank_seed)   # noise and t
        if resume_url is not None:
            with tempfile.TemporaryDirectory(prefix="archipelago-resume-") as tmp:
                ckpt.download_optimizer(resume_url, resume_meta, Path(tmp))
                wrapped.load_optimizer(Path(tmp))
            _restore_rng(resume_url, resume_meta, rank, world_size, noise)

        # ---- loop --------------------------------------------------------------------------------------
        total = ecfg.steps
        last = total if max_steps is None else min(total, max_steps)
        info = {"rank": rank, "world_size": world_size, "strategy": ecfg.strategy, "start_step": start_step,
                "total_steps": total, "out_url": out_url, "config": cfg, "shard": shard,
                "model": wrapped.module, "ema": ema, "lease": manager.lease}
        for cb in callbacks:
            cb.on_start(info)
        wrapped.module.train()
        amp = autocast(device, ecfg.precision)
        loss_sum = torch.zeros((), device=device)
        window_steps, window_good, window_t0 = 0, 0, time.perf_counter()
        loop_s = ckpt_s = 0.0
        steps_timed = 0
        final_loss = float("nan")
        metrics: dict[str, float] = {}
        guard = NonFiniteGuard(ecfg.on_nonfinite, ecfg.max_nonfinite_skips, what, "expert.on_nonfinite")
        guard.last_good = preempt.last_checkpoint = resume_url
        skip_mode = ecfg.on_nonfinite == "skip"
        for step in range(start_step + 1, last + 1):
            lr = lr_at(step - 1, ecfg)
            wrapped.set_lr(lr)
            step_loss = torch.zeros((), device=device)
            for m in range(ecfg.grad_accum):
                xb, yb = micro_batch((step - 1) * ecfg.grad_accum + m)
                with amp:
                    loss = flow_matching_loss(wrapped.module, xb, yb, generator=noise)
                wrapped.backward(loss, sync=m == ecfg.grad_accum - 1)
                step_loss += loss.detach()
            grad_norm = wrapped.step(skip_nonfinite=skip_mode)

            # Divergence and preemption, decided alike on every rank (one tiny all-reduce per step); the
            # weights are checked too before anything is written from them.
            saving = step == total or (step < total and (step % ecfg.checkpoint_every == 0 or step == 1))
            loss_bad, preempted, weights_bad = agree(
                [float(not bool(torch.isfinite(step_loss))), float(preempt.requested),
                 float((saving or preempt.requested) and not params_finite([wrapped.module]))], device)
            good = guard.check(step, float("nan") if loss_bad else float(step_loss) / ecfg.grad_accum,
                               float(grad_norm), weights_ok=not weights_bad)
            if good:
                wrapped.update_ema(ema)
                loss_sum += step_loss
                window_good += 1
            window_steps += 1

            if step % ecfg.log_every == 0 or step == last:
                mean_loss = (_mean_over_ranks(loss_sum) / (window_good * ecfg.grad_accum) if window_good
                             else float("nan"))                 # every step of the window skipped
                elapsed = time.perf_counter() - window_t0
                loop_s, steps_timed = loop_s + elapsed, steps_timed + window_steps
                metrics = {"loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm),
                           "samples_per_s": window_steps * ecfg.batch_size / elapsed,
                           "step_time_s": elapsed / window_steps}
                if skip_mode:
                    metrics["nonfinite_skipped"] = float(guard.skipped)
                final_loss = mean_loss
                for cb in callbacks:
                    cb.on_step(step, metrics)
                loss_sum.zero_()
                window_steps, window_good, window_t0 = 0, 0, time.perf_counter()

            # Periodic checkpoint; also at step 1, so a bad store or strategy fails in seconds, not hours;
            # and on SIGTERM, the step that just finished (a resume then loses no step).
            periodic = step < total and (step % ecfg.checkpoint_every == 0 or step == 1)
            if periodic or (preempted and step < last):
                t0 = time.perf_counter()
                url = manager.save(step, wrapped, ema, rng=rng_state(noise), metrics=metrics)
                guard.last_good = preempt.last_checkpoint = url
                for cb in callbacks:
                    cb.on_checkpoint(step, url)
                ckpt_s += time.perf_counter() - t0
                window_t0 += time.perf_counter() - t0      # checkpoint time is not step time
            if preempted and step < last:
                raise Preempted(f"{what}: SIGTERM; step {step} checkpointed {preempt.elapsed():.2f}s after the "
                                f"signal ({preempt.last_checkpoint}); run the same command to resume at step "
                                f"{step + 1} (exit {PREEMPTED_EXIT})")

        # ---- final checkpoint --------------------------------------------------------------------------
        final_url = None
        if last == total:
            t0 = time.perf_counter()
            # start_step: where the run that finished began (0, or the checkpoint it resumed from)
            final_url = manager.save(total, wrapped, ema, rng=rng_state(noise),
                                     metrics={**metrics, "start_step": start_step}, final=True)
            for cb in callbacks:
                cb.on_checkpoint(total, final_url)
            ckpt_s += time.perf_counter() - t0
        result = {"final_checkpoint": final_url, "steps": last, "start_step": start_step,
                  "final_loss": final_loss,
                  "samples_per_s": steps_timed * ecfg.batch_size / loop_s if loop_s > 0 else float("nan"),
                  "strategy": ecfg.strategy, "world_size": world_size, "checkpoint_s": ckpt_s,
                  "wall_s": time.perf_counter() - t_start, "out_url": out_url, "shard": shard}
        for cb in callbacks:
            cb.on_end(result)
        if created_group and world_size > 1:
            dist.barrier()   # no rank tears the group down while a peer still talks to it (gloo aborts)
        return result
    finally:
        stack.close()
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


def _build_model(ecfg: ExpertConfig, image_shape: list[int], num_classes: int) -> torch.nn.Module:
    """DiT for [C,H,W] shards, VideoDiT for [C,F,H,W]."""
    if len(image_shape) == 4:
        from archipelago.experts.video_dit import build_video_dit

        return build_video_dit(ecfg, input_size=image_shape[-1], in_channels=image_shape[0],
                               num_classes=num_classes)
    from archipelago.experts.dit import build_dit

    return build_dit(ecfg, input_size=image_shape[-1], in_channels=image_shape[0], num_classes=num_classes)


def _finished(manager: ckpt.CheckpointManager, cfg: ArchipelagoConfig) -> dict[str, Any] | None:
    """The result of an earlier run of this exact config, if its final checkpoint is complete and valid."""
    url = manager.final_url
    meta = ckpt.verified_or_none(url, "training again")
    if meta is None or meta.get("config_hash") != cfg.config_hash():
        return None
    m = meta.get("metrics", {})
    return {"final_checkpoint": url, "steps": meta["step"], "start_step": meta["step"],
            "final_loss": m.get("loss", float("nan")), "samples_per_s": m.get("samples_per_s", float("nan")),
            "strategy": meta["strategy"], "world_size": meta["world_size"], "checkpoint_s": 0.0, "wall_s": 0.0,
            "out_url": manager.run_url, "shard": meta.get("shard"), "cached": True}


def _restore_rng(url: str, meta: dict[str, Any], rank: int, world_size: int, noise: torch.Generator) -> None:
    """Restore this rank's RNG streams; with another world size the streams cannot match, so reseed."""
    states = ckpt.read_tensors(url, ckpt.RNG, meta)
    if meta.get("world_size") != world_size or f"rank{rank}.noise" not in states:
        seed = (int(meta["step"]) + 1) * 1_000_003 + rank
        log.warning("resuming at world size %d from a world-size-%s checkpoint: RNG reseeded", world_size,
                    meta.get("world_size"))
        torch.manual_seed(seed)
        noise.manual_seed(seed)
        return
    torch.set_rng_state(states[f"rank{rank}.torch"])
    noise.set_state(states[f"rank{rank}.noise"])
    if torch.cuda.is_available() and f"rank{rank}.cuda" in states:
        torch.cuda.set_rng_state(states[f"rank{rank}.cuda"])


# ----------------------------------------------------------------------------------------------------
# CLI entry point (python -m archipelago.experts.train / torchrun)
# ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from archipelago.config import load_config

    p = argparse.ArgumentParser(
        prog="python -m archipelago.experts.train",
        description="Train one expert on one shard (single process, or under torchrun).",
        epilog="example: torchrun --nproc-per-node 2 -m archipelago.experts.train --config "
               "configs/digits-quickstart.yaml --shard 0 --data runs/data --out runs/expert-000 "
               "--set expert.strategy=ddp")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a config field, e.g. --set expert.steps=50 (repeatable).")
    p.add_argument("--shard", type=int, required=True, help="Shard id k (= expert id).")
    p.add_argument("--data", required=True, help="URL of the prepared data (manifest.json + shards).")
    p.add_argument("--out", required=True, help="URL of this expert's run (checkpoints/, final/, metrics.jsonl).")
    p.add_argument("--max-steps", type=int, default=None, help="Stop after this step (no final checkpoint).")
    p.add_argument("--no-resume", action="store_true", help="Ignore existing checkpoints under --out.")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="Rich progress bar on rank 0 (auto: when stderr is a terminal).")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(args.config, args.overrides)
        show = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
        cbs = [RichProgressCallback(f"expert {args.shard}")] if show else []
        result = train_expert(cfg, args.shard, args.data, args.out, callbacks=cbs, resume=not args.no_resume,
                              max_steps=args.max_steps)
    except ArchipelagoError as exc:
        print(f"{exc.label}: {storage.redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: steps={result['steps']} final_loss={result['final_loss']:.4f} "
              f"samples/s={result['samples_per_s']:.1f} final={result['final_checkpoint']}", file=sys.stderr)
    return 0


def _exit(code: int) -> None:
    """Exit; multi-process runs skip interpreter teardown (after flushing everything).

    The process group is already destroyed and every file is written atomically, but on a loaded machine
    a gloo rank tearing down its C++ state while its peer exits sometimes aborts ("terminate called
    without an active exception", seen with FSDP2 and DeepSpeed), turning a finished run into a failed
    job. Nothing is left to clean up, so skip the teardown.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
