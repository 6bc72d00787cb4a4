"""DDM vs one monolithic model at equal training FLOPs, on the embedded digits (arXiv 2501.05450's claim).

Arms (all DiT-T experts of the quickstart, batch 64, same optimiser, EMA and sampler):
  monolith          one DiT on all data, K*S steps                 (budget: K * S * 64 samples)
  DDM K, kmeans     K experts on the K feature clusters, S steps each  (same budget), router, ensemble
                    sampled in full, top-2 and top-1
  DDM K, random     the same on a *random* partition (ablation: no semantic clusters)
  DDM 2K, kmeans    2K experts, S/2 steps each (same budget again)
Equal FLOPs: every arm trains the same model size on the same number of samples x steps; the monolith
gets K x the steps at the same batch (not K x the batch): at this scale more optimiser steps is the
*stronger* monolith, so this is the harder test for the DDM. The router's training FLOPs are reported on
top, as in the paper (which also does not charge them to the DDM's budget).

Scores (archipelago.eval, offline): Fréchet distance in the features of a digits classifier trained on
the train split (FD; lower is better; `floor` is FD of real data of the same size), bootstrap std of FD
over the generated set, class-consistency (classifier agrees with the conditioning class), sampling
cost per image (wall time; expert forward evaluations incl. both CFG branches). FID needs Inception
weights, which are not on this machine: reported as null with the reason.

    OMP_NUM_THREADS=2 python benchmarks/ddm_vs_monolithic.py               # ~15 min on 2 CPU cores
    python benchmarks/ddm_vs_monolithic.py --quick                         # smoke run, ~1 min
Outputs are cached under --work (re-running reuses trained experts/routers with the same config).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from archipelago.config import ArchipelagoConfig
from archipelago.eval.flops import dit_forward_flops, train_flops

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "load_avg_1m_at_end": os.getloadavg()[0]}


# ----------------------------------------------------------------------------------------------------
# Training arms
# ----------------------------------------------------------------------------------------------------

def base_config(args: argparse.Namespace) -> ArchipelagoConfig:
    from archipelago.config import load_config

    cfg = load_config(REPO / "configs/digits-quickstart.yaml")
    cfg.expert.checkpoint_every = 10_000
    cfg.expert.log_every = 50
    cfg.expert.sample_steps = args.sample_steps
    cfg.expert.cfg_scale = args.cfg
    if args.quick:
        cfg.expert.hidden_size, cfg.expert.depth, cfg.expert.num_heads = 32, 2, 2
        cfg.router.steps, cfg.router.hidden_size = 40, 32
    return cfg


def prepare(cfg: ArchipelagoConfig, work: Path, k: int, partitioner: str) -> str:
    from archipelago.data.prepare import prepare_data

    url = str(work / f"data-{partitioner}-k{k}")
    c = cfg.data.model_copy(update={"num_clusters": k, "partitioner": partitioner})
    m = prepare_data(c, url, progress=False)
    log(f"data {partitioner} K={k}: shards {m.counts}, purity {m.purity}")
    return url


def _train_expert_job(cfg_raw: dict, shard: int, data_url: str, out_url: str) -> dict[str, Any]:
    """One expert in a worker process (one torch thread: two small jobs beat one job on two threads)."""
    torch.set_num_threads(1)
    from archipelago.experts.train import train_expert

    return train_expert(ArchipelagoConfig.model_validate(cfg_raw), shard, data_url, out_url)


def _train_router_job(cfg_raw: dict, data_url: str, out_url: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    from archipelago.router.train import train_router

    return train_router(ArchipelagoConfig.model_validate(cfg_raw), data_url, out_url)


def arm_config(cfg: ArchipelagoConfig, k: int, steps: int, ref_steps: int, ema: str) -> ArchipelagoConfig:
    """The config of one arm. ema="matched": the EMA decay is rescaled so its half-life is the same
    *fraction* of the run as the monolith's (decay ** (ref_steps / steps)). Without it, a 300-step expert
    with the monolith's 0.995 still holds 0.995**300 = 22% of its initial (zero-output) weights when it is
    sampled, against 0.2% for the 1200-step monolith: an artefact of run length, not of decentralisation
    (measured: FD 684 with that EMA vs 109 with the raw weights of the same expert)."""
    c = cfg.model_copy(deep=True)
    c.expert.steps = steps
    c.expert.warmup_steps = min(c.expert.warmup_steps, max(1, steps // 10))
    if ema == "matched":
        c.expert.ema_decay = round(cfg.expert.ema_decay ** (ref_steps / steps), 6)
    c.data = c.data.model_copy(update={"num_clusters": k})
    return c


def arm_dir(work: Path, name: str, c: ArchipelagoConfig) -> Path:
    """One directory per arm *and config*: train_expert resumes whatever checkpoint it finds in its output
    directory (even one written with another EMA decay or step count), so runs must never share one."""
    return work / f"{name}-{c.config_hash()[:10]}"


def train_arms(pool: Any, cfg: ArchipelagoConfig, work: Path, specs: dict[str, tuple[str, int, int]],
               ema: str) -> dict[str, dict[str, Any]]:
    """Train every arm {name: (data_url, K, steps per expert)}: all experts and routers as independent
    jobs on `pool` (the islands of the DDM: nothing is shared between them), then write ensemble.json."""
    from archipelago.ensemble import write_ensemble

    ref_steps = specs["monolith"][2]
    jobs: dict[tuple[str, Any], Any] = {}
    for name, (data_url, k, steps) in specs.items():
        c = arm_config(cfg, k, steps, ref_steps, ema)
        raw, run = c.model_dump(mode="json"), arm_dir(work, name, c)
        if k > 1:   # routers first: they are the longest single jobs
            jobs[(name, "router")] = pool.submit(_train_router_job, raw, data_url, str(run / "router"))
        for shard in range(k):
            jobs[(name, shard)] = pool.submit(_train_expert_job, raw, shard, data_url, str(run / f"expert-{shard}"))
    arms: dict[str, dict[str, Any]] = {}
    for name, (data_url, k, steps) in specs.items():
        c = arm_config(cfg, k, steps, ref_steps, ema)
        experts, wall, loss = {}, 0.0, []
        for shard in range(k):
            r = jobs[(name, shard)].result()
            experts[shard], wall = r["final_checkpoint"], wall + r["wall_s"]
            loss.append(r["final_loss"])
        took = "cached" if wall == 0 else f"{wall:.0f}s of expert training"
        log(f"{name}: {k} experts x {steps} steps, final losses {[round(v, 4) for v in loss]} ({took})")
        arm: dict[str, Any] = {"name": name, "k": k, "steps_per_expert": steps, "batch": c.expert.batch_size,
                               "ema_decay": c.expert.ema_decay,
                               "experts": experts, "expert_train_wall_s": wall, "final_losses": loss}
        if k > 1:
            rr = jobs[(name, "router")].result()
            log(f"{name}: router alignment {rr['metrics']['alignment']:.3f}, acc per t-bin "
                f"{[round(b['accuracy'], 3) for b in rr['metrics']['t_bins']]}")
            arm.update(router=rr["router"], router_metrics=rr["metrics"], router_train_wall_s=rr["wall_s"],
                       ensemble=str(arm_dir(work, name, c) / "ensemble.json"))
            write_ensemble(arm["ensemble"], experts, rr["router"], data_url, c.config_hash(), name=name)
        arms[name] = arm
    return arms


# ----------------------------------------------------------------------------------------------------
# Sampling + scoring
# ----------------------------------------------------------------------------------------------------

def score(samples: torch.Tensor, labels: torch.Tensor, clf: torch.nn.Module, ref_f: np.ndarray,
          boots: int, seed: int = 0) -> dict[str, float]:
    from archipelago.eval.metrics import class_consistency, extract_features, frechet_distance

    f = extract_features(clf, samples)
    rng = np.random.default_rng(seed)
    bs = [frechet_distance(f[rng.integers(0, len(f), len(f))], ref_f) for _ in range(boots)]
    return {"fd": frechet_distance(f, ref_f), "fd_boot_std": float(np.std(bs)) if bs else None,
            "class_consistency": class_consistency(samples, labels, clf)}


def trajectory_alignment(log_: list[torch.Tensor]) -> dict[str, float]:
    """From top-1 routing decisions per step ([N] each, conditional half): how often the expert chosen at a
    step is the one chosen at the last step (the expert the finished sample 'belongs' to), and how many
    times per sample the chosen expert switches."""
    r = torch.stack(log_)                                   # [steps, N]
    final = r[-1]
    return {"agree_with_final": float((r == final).float().mean()),
            "switches_per_sample": float((r[1:] != r[:-1]).float().sum(0).mean()),
            "final_expert_counts": torch.bincount(final, minlength=int(r.max()) + 1).tolist()}


def sample_model(model: torch.nn.Module, n: int, args: argparse.Namespace,
                 cfg_scale: float) -> tuple[torch.Tensor, dict]:
    from archipelago.generate import generate

    if hasattr(model, "reset_counters"):
        model.reset_counters()
    t = time.perf_counter()
    x = generate(model, n, cfg_scale=cfg_scale, seed=args.seed, steps=args.sample_steps, sampler="euler")
    wall = time.perf_counter() - t
    cost = {"wall_s_per_image": wall / n}
    if hasattr(model, "expert_samples"):
        cost["expert_evals_per_image"] = sum(model.expert_samples) / n
        cost["expert_calls"] = model.expert_calls
    else:
        cost["expert_evals_per_image"] = (2 if cfg_scale != 1.0 else 1) * args.sample_steps
        cost["expert_calls"] = args.sample_steps
    return x, cost


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4, help="Experts of the main DDM arm (the second arm has 2K).")
    ap.add_argument("--steps", type=int, default=300, help="S: steps per expert of the K arm.")
    ap.add_argument("--no-2k", action="store_true", help="Skip the 2K-expert arm.")
    ap.add_argument("--no-random", action="store_true", help="Skip the random-sharding ablation arm.")
    ap.add_argument("--n", type=int, default=400, help="Generated samples per model (classes balanced).")
    ap.add_argument("--sample-steps", type=int, default=20, help="Euler steps.")
    ap.add_argument("--cfg", type=float, default=2.0, help="Guidance scale (part of every arm's config).")
    ap.add_argument("--sample-cfg", type=float, nargs="+", default=None,
                    help="Guidance scales to sample and score every arm at (default: --cfg). Sampling only: "
                         "trained arms in --work are reused.")
    ap.add_argument("--seed", type=int, default=0, help="Sampling noise seed (same for every model).")
    ap.add_argument("--boots", type=int, default=20, help="Bootstrap resamples for the FD std.")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                    help="torch threads for sampling.")
    ap.add_argument("--jobs", type=int, default=2, help="Parallel training jobs (one thread each).")
    ap.add_argument("--work", default=str(REPO / "runs/benchmarks/ddm_vs_monolithic"))
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/ddm_vs_monolithic.json"))
    ap.add_argument("--ema", choices=("matched", "fixed"), default="matched",
                    help="matched: EMA half-life the same fraction of every run (see arm_config); fixed: the "
                         "config's decay for every arm (biases short runs towards their initial weights).")
    ap.add_argument("--quick", action="store_true", help="Tiny smoke run (results meaningless).")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.n, args.sample_steps, args.boots = 8, 40, 4, 2
        args.work = args.work + "-quick"
        args.out = str(Path(args.work) / "ddm_vs_monolithic-quick.json")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    cfg = base_config(args)
    k, s = args.k, args.steps
    if s % 2:
        raise SystemExit("--steps must be even (the 2K arm trains S/2 steps per expert)")

    # ---- data --------------------------------------------------------------------------------------
    data = {"all": prepare(cfg, work, 1, "kmeans"), "kmeans": prepare(cfg, work, k, "kmeans")}
    if not args.no_random:
        data["random"] = prepare(cfg, work, k, "random")
    if not args.no_2k:
        data["kmeans2k"] = prepare(cfg, work, 2 * k, "kmeans")

    # ---- evaluator (classifier on the train split; reference = all data) ----------------------------
    from archipelago.data.shards import read_all
    from archipelago.eval.classifier import load_or_train_classifier
    from archipelago.eval.metrics import extract_features, frechet_distance

    clf, clf_info = load_or_train_classifier(data["all"])
    ref = read_all(data["all"])[0]
    ref_f = extract_features(clf, ref)
    idx = np.random.default_rng(0).permutation(len(ref))[: args.n]
    floor = frechet_distance(ref_f[idx], ref_f)
    log(f"classifier test accuracy {clf_info['test_accuracy']:.3f}; FD floor (real n={args.n}) {floor:.2f}")

    # ---- train every arm at the same budget (experts and routers as parallel jobs) ------------------
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    specs = {"monolith": (data["all"], 1, k * s), f"ddm-k{k}-kmeans": (data["kmeans"], k, s)}
    if not args.no_random:
        specs[f"ddm-k{k}-random"] = (data["random"], k, s)
    if not args.no_2k:
        specs[f"ddm-k{2 * k}-kmeans"] = (data["kmeans2k"], 2 * k, s // 2)
    t_train = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        arms = train_arms(pool, cfg, work, specs, args.ema)
    train_wall = time.perf_counter() - t_train
    log(f"training done in {train_wall:.0f}s wall ({args.jobs} jobs)")

    from archipelago.experts.checkpoint import read_meta
    from archipelago.router.model import router_forward_flops
    from archipelago.router.train import read_router_meta

    e_args = read_meta(arms["monolith"]["experts"][0])["model"]["args"]
    e_fwd = dit_forward_flops(e_args)
    for arm in arms.values():
        arm["train_flops"] = arm["k"] * train_flops(e_fwd, arm["batch"], arm["steps_per_expert"])
        if "router" in arm:
            rmeta = read_router_meta(arm["router"])
            arm["router_train_flops"] = train_flops(router_forward_flops(rmeta["model"]["args"]),
                                                    cfg.router.batch_size, cfg.router.steps)
    budget = arms["monolith"]["train_flops"]
    assert all(a["train_flops"] == budget for a in arms.values()), "arms are not FLOP-matched"

    # ---- sample + score -------------------------------------------------------------------------------
    from archipelago.ensemble import load_ensemble
    from archipelago.experts.checkpoint import load_expert
    from archipelago.generate import default_classes

    labels = default_classes(args.n, 10)
    rows: list[dict[str, Any]] = []
    model, _ = load_expert(arms["monolith"]["experts"][0])
    for g in args.sample_cfg or [args.cfg]:
        x, cost = sample_model(model, args.n, args, g)
        rows.append({"arm": "monolith", "mode": "-", "cfg": g, **score(x, labels, clf, ref_f, args.boots), **cost})
        log(f"monolith cfg {g}: FD {rows[-1]['fd']:.2f}, class-consistency {rows[-1]['class_consistency']:.3f}")
        for name, arm in arms.items():
            if name == "monolith":
                continue
            ens = load_ensemble(arm["ensemble"], mode="full")
            for mode in ("full", "top-2", "top-1"):
                ens.mode = mode
                ens.record_routing = mode == "top-1"
                x, cost = sample_model(ens, args.n, args, g)
                row = {"arm": name, "mode": mode, "cfg": g, **score(x, labels, clf, ref_f, args.boots), **cost}
                if mode == "top-1":
                    row["trajectory"] = trajectory_alignment(ens.routing_log)
                rows.append(row)
                log(f"{name} {mode} cfg {g}: FD {row['fd']:.2f} ± {row['fd_boot_std']:.2f}, class-consistency "
                    f"{row['class_consistency']:.3f}, {row['expert_evals_per_image']:.0f} expert evals/img")

    # ---- report -------------------------------------------------------------------------------------------
    from archipelago.eval.metrics import inception_weights

    _, fid_note = inception_weights()
    result = {
        "benchmark": "ddm_vs_monolithic", "quick": args.quick,
        "setup": {"k": k, "steps_per_expert_k": s, "monolith_steps": k * s, "batch": cfg.expert.batch_size,
                  "expert_dims": e_args, "expert_forward_flops_per_sample": e_fwd,
                  "train_flops_per_arm": budget, "equal_flops": "monolith: same model, K x steps, same batch",
                  "ema": args.ema, "n_samples": args.n, "sample_steps": args.sample_steps, "sampler": "euler",
                  "cfg_scale": args.cfg, "sample_cfg": args.sample_cfg or [args.cfg], "seed": args.seed, "reference": "all 1,797 digits (16x16)",
                  "fd_floor_real_same_n": floor, "classifier": {k_: clf_info[k_] for k_ in
                                                                ("test_accuracy", "train_accuracy", "steps")}},
        "fid": None, "fid_note": fid_note,
        "arms": {n_: {k_: v for k_, v in a.items() if k_ not in ("experts",)} for n_, a in arms.items()},
        "rows": rows, "machine": machine(), "wall_s_total": time.perf_counter() - T0,
        "train_wall_s": train_wall, "train_jobs": args.jobs,
        "created_at": time.time(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"DDM vs monolith at equal training FLOPs ({budget / 1e12:.2f} TFLOPs per arm); "
                        f"FD floor {floor:.2f}")
    for col in ("arm", "mode", "cfg", "FD ↓", "± boot", "class-cons ↑", "ms/img", "expert evals/img",
                "router align", "traj. agree"):
        table.add_column(col, justify="left" if col in ("arm", "mode") else "right")
    for r in rows:
        arm = arms[r["arm"]]
        align = f"{arm['router_metrics']['alignment']:.3f}" if "router_metrics" in arm else "-"
        traj = f"{r['trajectory']['agree_with_final']:.3f}" if "trajectory" in r else "-"
        table.add_row(r["arm"], r["mode"], f"{r['cfg']:g}", f"{r['fd']:.2f}", f"{r['fd_boot_std']:.2f}",
                      f"{r['class_consistency']:.3f}", f"{1000 * r['wall_s_per_image']:.1f}",
                      f"{r['expert_evals_per_image']:.0f}", align, traj)
    Console(width=160).print(table)
    rt = Table(title="router accuracy per t-bin (held-out data; t=0 data, t=1 noise)")
    rt.add_column("arm")
    arms_r = [a for a in arms.values() if "router_metrics" in a]
    for b in arms_r[0]["router_metrics"]["t_bins"] if arms_r else []:
        rt.add_column(f"t {b['t_lo']:.1f}-{b['t_hi']:.1f}", justify="right")
    for col in ("ECE", "alignment", "chance"):
        rt.add_column(col, justify="right")
    for a in arms_r:
        m = a["router_metrics"]
        rt.add_row(a["name"], *[f"{b['accuracy']:.3f}" for b in m["t_bins"]], f"{m['ece']:.3f}",
                   f"{m['alignment']:.3f}", f"{m['chance']:.3f}")
    Console(width=160).print(rt)
    print(fid_note)
    print(f"wrote {args.out} ({time.perf_counter() - T0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
