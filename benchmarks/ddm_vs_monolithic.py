"""DDM vs one monolithic model at equal training FLOPs, at the paper's protocol (arXiv 2501.05450), on the
embedded digits: an ablation grid at 1x, then the paper's configuration against the monolith over a budget
curve.

Budget unit (1x): the monolith trains expert.steps = 1200 x budget steps at batch 64 (6.84 TFLOPs at 1x).
A DDM arm is FLOP-matched to it by `islands.flop_match` (recorded per arm):
  batch  every expert trains the same 1200 x budget steps at batch 64 / K   (the paper; the default)
  steps  every expert trains 1200 x budget / K steps at batch 64             (our earlier protocol)
The router's training FLOPs are charged to the DDM arms on top (it is part of what a DDM costs).
Ablation grid at 1x (--stage grid): K in {4, 8} x protocol x router {r(x_t,t,y), r(x_t,t)} x embedder
{pixel_pca, classifier (our DINOv2 stand-in)}. Budget curve (--stage curve --budget 4 / 16): monolith vs the
paper's configuration (batch protocol, classifier embedder, the router that won the grid) at K=8 and K=4.

Every model is scored on a held-out split (data.holdout_fraction=0.2 of the source; no expert, router or
monolith sees it) with our offline classifier (trained on the training split): Fréchet distance in its
features (FD, lower is better; `floor` = FD of n real training images to the held-out set), class
consistency, and memorisation (nearest-neighbour distance of samples to the training set over that to the
held-out set, training set subsampled to the held-out size: ~1 generalises, << 1 copies).

Guidance is bracketed per arm and routing mode: sampled on --cfg-grid, extended at either end (down to
--cfg-min, up to --cfg-max) until the best scale is inside the grid; each arm is reported at its own best
and at the shared scale --cfg-shared. Routing modes: top-1 and sample-once (k ~ p(k|y) once per sample,
exact for class-conditional experts at one expert's cost) are bracketed; top-2 is sampled at the shared
scale and at the arm's best top-1 scale, full (K expert calls per step) at the shared scale for the
batch-protocol arms (its cost dominated the grid; the steps-protocol arms were measured in full before).

    OMP_NUM_THREADS=1 python benchmarks/ddm_vs_monolithic.py --stage grid            # ~35 min, 2 CPUs
    OMP_NUM_THREADS=1 python benchmarks/ddm_vs_monolithic.py --stage curve --budget 4
    python benchmarks/ddm_vs_monolithic.py --stage curve --budget 64 --device cuda   # on a GPU
    python benchmarks/ddm_vs_monolithic.py --plot                                    # FD vs FLOPs PNG
    python benchmarks/ddm_vs_monolithic.py --quick                                   # smoke run, ~2 min
Trained experts/routers are cached under --work by config hash, scored rows too (an interrupted run resumes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import machine, write_report

from archipelago.config import ArchipelagoConfig, island_expert_config, load_config

T0 = time.perf_counter()
BASE_STEPS = 1200                     # the monolith's steps at 1x (batch 64)
ROUTERS = {"xty": True, "xt": False}  # r(x_t, t, y) (the paper's) | r(x_t, t)
RESULTS = REPO / "benchmarks" / "results"


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Configs, data, training jobs
# ----------------------------------------------------------------------------------------------------

def base_config(args: argparse.Namespace) -> ArchipelagoConfig:
    cfg = load_config(REPO / "configs/digits-quickstart.yaml")
    # The arms' own settings: nothing below may follow later edits of the quickstart (the trained-arm cache
    # is keyed by config hash, and the comparison must not drift with the quickstart's tuning).
    cfg.expert.lr, cfg.expert.warmup_steps, cfg.inference.num_samples = 6e-4, 20, 64
    cfg.expert.sample_steps, cfg.expert.sampler, cfg.expert.cfg_scale = args.sample_steps, "euler", 2.0
    cfg.data.holdout_fraction = args.holdout
    cfg.expert.batch_size = 64
    cfg.expert.ema_decay = 0.995
    # The 1x grid runs minutes per arm (no checkpoints: its cache keys predate this line); the curve's longer
    # runs checkpoint so an interrupted 16x run resumes instead of starting over.
    cfg.expert.checkpoint_every = 100_000 if args.stage == "grid" or args.quick else 1000
    cfg.expert.log_every = 100
    cfg.expert.sample_steps = args.sample_steps
    if args.quick:
        cfg.expert.hidden_size, cfg.expert.depth, cfg.expert.num_heads = 32, 2, 2
        cfg.router.steps, cfg.router.hidden_size = 40, 32
    return cfg


def arm_config(cfg: ArchipelagoConfig, k: int, embedder: str, protocol: str, steps: int,
               router: str = "xty") -> ArchipelagoConfig:
    c = cfg.model_copy(deep=True)
    c.data = c.data.model_copy(update={"num_clusters": k, "embedder": embedder})
    c.islands.flop_match = protocol            # type: ignore[assignment]
    c.expert.steps = steps
    c.expert.warmup_steps = min(c.expert.warmup_steps, max(1, steps // 10))
    c.router.class_conditional = ROUTERS[router]
    return c


def prepare(cfg: ArchipelagoConfig, work: Path) -> tuple[str, dict[str, Any]]:
    from archipelago.data.prepare import prepare_data

    url = str(work / f"data-{cfg.data.embedder}-k{cfg.data.num_clusters}")
    m = prepare_data(cfg.data, url, progress=False)
    info = {"counts": m.counts, "purity": m.purity, "class_majority_share": m.class_majority_share,
            "holdout": m.holdout.count if m.holdout else 0}
    return url, info


def _expert_job(raw: dict, shard: int, data_url: str, out_url: str, device: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    from archipelago.experts.train import train_expert

    if device == "cuda":
        torch.cuda.set_device(0)
    return train_expert(ArchipelagoConfig.model_validate(raw), shard, data_url, out_url)


def _router_job(raw: dict, data_url: str, out_url: str, device: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    from archipelago.router.train import train_router

    return train_router(ArchipelagoConfig.model_validate(raw), data_url, out_url, device=device)


def run_dir(work: Path, tag: str, c: ArchipelagoConfig) -> Path:
    """One directory per trained thing *and config* (train_expert resumes whatever it finds there).

    Keyed by the sections that shape a trained model (data, expert, router, islands.flop_match), without
    fields at their default: a new config field (which arrives at its default) or an edit elsewhere (tracking,
    inference, storage) keeps every cached arm. A *changed default* of a field this script does not set is
    not seen: move --work (or delete the cache) after such a change."""
    key = {"data": c.data.model_dump(mode="json", exclude_defaults=True),
           "expert": c.expert.model_dump(mode="json", exclude_defaults=True),
           "router": c.router.model_dump(mode="json", exclude_defaults=True),
           "flop_match": c.islands.flop_match}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return work / f"{tag}-{digest[:10]}"


# ----------------------------------------------------------------------------------------------------
# Sampling (a pool of single-thread workers: small batches parallelise better across processes)
# ----------------------------------------------------------------------------------------------------

_MODELS: dict[str, Any] = {}


def _sample_job(source: str, mode: str, n: int, cfg_scale: float, steps: int, seed: int,
                device: str) -> tuple[torch.Tensor, dict[str, Any]]:
    torch.set_num_threads(1)
    from archipelago.generate import generate, load_sampler_model

    model = _MODELS.get(source)
    if model is None:
        model = _MODELS[source] = load_sampler_model(source, device=device)
    if hasattr(model, "experts"):
        model.mode = mode
        model.reset_counters()
    t = time.perf_counter()
    x = generate(model, n, cfg_scale=cfg_scale, seed=seed, steps=steps, sampler="euler")
    cost = {"wall_s_per_image": (time.perf_counter() - t) / n}
    if hasattr(model, "experts"):
        cost["expert_evals_per_image"] = sum(model.expert_samples) / n
        cost["router_evals_per_image"] = model.router_samples / n
    else:
        cost["expert_evals_per_image"] = (2 if cfg_scale != 1.0 else 1) * steps
    return x, cost


class Scorer:
    """FD / class-consistency / memorisation against the held-out split, in the classifier's features."""

    def __init__(self, data_url: str, n: int, boots: int):
        from archipelago.data.shards import read_all, read_holdout
        from archipelago.eval.classifier import load_or_train_classifier
        from archipelago.eval.metrics import extract_features, frechet_distance

        self.clf, self.info = load_or_train_classifier(data_url)
        self.train = read_all(data_url)[0]
        self.held = read_holdout(data_url).images
        self.ref_f = extract_features(self.clf, self.held)
        train_f = extract_features(self.clf, self.train)
        idx = np.random.default_rng(0).permutation(len(self.train))[:n]
        self.floor = frechet_distance(train_f[idx], self.ref_f)
        self.floor_train_ref = frechet_distance(train_f[idx], train_f)
        self.boots = boots

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        from archipelago.eval.metrics import (
            class_consistency,
            extract_features,
            frechet_distance,
            memorisation,
        )

        f = extract_features(self.clf, x)
        rng = np.random.default_rng(0)
        bs = [frechet_distance(f[rng.integers(0, len(f), len(f))], self.ref_f) for _ in range(self.boots)]
        return {"fd": frechet_distance(f, self.ref_f), "fd_boot_std": float(np.std(bs)) if bs else None,
                "class_consistency": class_consistency(x, labels, self.clf),
                "memorisation": memorisation(x, self.train, self.held)["ratio"]}


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--stage", choices=("grid", "curve"), default="grid",
                    help="grid: the 1x ablation grid; curve: paper configuration vs monolith at --budget.")
    ap.add_argument("--budget", type=float, default=1.0, help="Budget multiple of the 1x unit (curve).")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8], help="Numbers of experts.")
    ap.add_argument("--protocol", nargs="+", default=["batch", "steps"], help="flop_match values (grid).")
    ap.add_argument("--router", nargs="+", default=list(ROUTERS), help="Router variants (grid): xty | xt.")
    ap.add_argument("--embedder", nargs="+", default=["pixel_pca", "classifier"], help="Embedders (grid).")
    ap.add_argument("--curve-router", default=None,
                    help="Router of the curve's DDM arms (default: the grid's winner, read from --grid-json).")
    ap.add_argument("--grid-json", default=str(RESULTS / "ddm_vs_monolithic.json"))
    ap.add_argument("--n", type=int, default=200, help="Samples per scored run (classes balanced).")
    ap.add_argument("--sample-steps", type=int, default=20, help="Euler steps.")
    ap.add_argument("--cfg-grid", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--cfg-min", type=float, default=0.0)
    ap.add_argument("--cfg-max", type=float, default=6.75)
    ap.add_argument("--cfg-shared", type=float, default=2.0, help="The one scale every arm is also reported at.")
    ap.add_argument("--holdout", type=float, default=0.2, help="data.holdout_fraction.")
    ap.add_argument("--seed", type=int, default=0, help="Sampling noise seed (the same for every model).")
    ap.add_argument("--boots", type=int, default=10, help="Bootstrap resamples for the FD std.")
    ap.add_argument("--jobs", type=int, default=2, help="Parallel training / sampling processes.")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--work", default=str(REPO / "runs/benchmarks/ddm_vs_monolithic"))
    ap.add_argument("--out", default=None, help="Report JSON (default: benchmarks/results/<stage name>.json).")
    ap.add_argument("--plot", action="store_true", help="Only draw the FD-vs-FLOPs plot from the results.")
    ap.add_argument("--quick", action="store_true", help="Tiny smoke run (results meaningless).")
    args = ap.parse_args(argv)
    if args.plot:
        return plot()
    if args.quick:
        args.n, args.sample_steps, args.boots, args.cfg_grid = 40, 4, 2, [1.0, 2.0]
        args.k = args.k[:1]
        args.work += "-quick"
        args.cfg_max = 3.0
    name = "ddm_vs_monolithic" if args.stage == "grid" else f"ddm_vs_monolithic_budget{args.budget:g}x"
    args.out = args.out or (str(Path(args.work) / f"{name}-quick.json") if args.quick else str(RESULTS / f"{name}.json"))
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    cfg = base_config(args)
    steps = max(2, round((8 if args.quick else BASE_STEPS) * args.budget))

    # ---- arms -----------------------------------------------------------------------------------------
    # (name, K, embedder, protocol, router); the monolith is K=1 on the pixel_pca data (one shard: the
    # embedder does not matter) and has no router.
    arms: list[tuple[str, int, str, str, str | None]] = [("monolith", 1, "pixel_pca", "batch", None)]
    if args.stage == "grid":
        for k in args.k:
            for emb in args.embedder:
                for proto in args.protocol:
                    for r in args.router:
                        arms.append((f"ddm-k{k}-{emb}-{proto}-{r}", k, emb, proto, r))
    else:
        router = args.curve_router or json.loads(Path(args.grid_json).read_text())["winner"]["router"]
        for k in args.k:
            arms.append((f"ddm-k{k}-classifier-batch-{router}", k, "classifier", "batch", router))
    log(f"{len(arms)} arms at {args.budget:g}x ({steps} monolith steps at batch 64): {[a[0] for a in arms]}")

    # ---- data -----------------------------------------------------------------------------------------
    data: dict[tuple[int, str], tuple[str, dict]] = {}
    for _, k, emb, _, _ in arms:
        if (k, emb) not in data:
            data[(k, emb)] = prepare(arm_config(cfg, k, emb, "batch", steps), work)
            log(f"data {emb} K={k}: {data[(k, emb)][1]}")
    scorer = Scorer(data[(1, "pixel_pca")][0], args.n, args.boots)
    log(f"classifier held-out accuracy {scorer.info['test_accuracy']:.3f}; FD floor {scorer.floor:.2f} "
        f"(train-vs-train {scorer.floor_train_ref:.2f})")

    # ---- train: experts per (K, embedder, protocol), routers per (K, embedder, router) ----------------
    from archipelago.ensemble import write_ensemble

    t_train = time.perf_counter()
    ctx = mp.get_context("spawn")
    futures: dict[tuple, Any] = {}
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        for _, k, emb, proto, r in arms:
            c = arm_config(cfg, k, emb, proto, steps, r or "xty")
            url = data[(k, emb)][0]
            if r is not None and ("router", k, emb, r) not in futures:
                futures[("router", k, emb, r)] = pool.submit(
                    _router_job, c.model_dump(mode="json"), url,
                    str(run_dir(work, f"router-k{k}-{emb}-{r}", c.model_copy(update={"expert": cfg.expert}))),
                    args.device)
            for s in range(k):
                key = ("expert", k, emb, proto, s)
                if key not in futures:
                    ec = c.model_copy(update={"router": cfg.router})     # experts do not depend on the router
                    futures[key] = pool.submit(_expert_job, ec.model_dump(mode="json"), s, url,
                                               str(run_dir(work, f"k{k}-{emb}-{proto}", ec) / f"expert-{s}"),
                                               args.device)
        results = {key: f.result() for key, f in futures.items()}
    train_wall = time.perf_counter() - t_train
    log(f"training done in {train_wall:.0f}s wall ({args.jobs} jobs)")

    from archipelago.eval.flops import dit_forward_flops, train_flops
    from archipelago.experts.checkpoint import read_meta
    from archipelago.router.model import router_forward_flops
    from archipelago.router.train import read_router_meta

    report_arms: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for name, k, emb, proto, r in arms:
        c = arm_config(cfg, k, emb, proto, steps, r or "xty")
        ex = [results[("expert", k, emb, proto, s)] for s in range(k)]
        e_meta = read_meta(ex[0]["final_checkpoint"])
        e_fwd = dit_forward_flops(e_meta["model"]["args"])
        island = island_expert_config(c, k)
        arm: dict[str, Any] = {
            "k": k, "embedder": emb, "flop_match": proto if k > 1 else "-", "router": r or "-",
            "steps_per_expert": island.steps, "batch_per_expert": island.batch_size,
            "ema_decay": island.ema_decay, "expert_flops": k * train_flops(e_fwd, island.batch_size, island.steps),
            "final_losses": [e["final_loss"] for e in ex], "data": data[(k, emb)][1],
            "expert_train_wall_s": sum(e["wall_s"] for e in ex)}
        if r is None:
            sources[name] = ex[0]["final_checkpoint"]
            arm["router_flops"] = 0
        else:
            rr = results[("router", k, emb, r)]
            rmeta = read_router_meta(rr["router"])
            arm["router_flops"] = train_flops(router_forward_flops(rmeta["model"]["args"]), cfg.router.batch_size,
                                              cfg.router.steps)
            arm["router_metrics"] = {"accuracy_per_t_bin": [
                {"t": [b["t_lo"], b["t_hi"]], "accuracy": b["accuracy"]} for b in rr["metrics"]["t_bins"]],
                "alignment": rr["metrics"]["alignment"], "ece": rr["metrics"]["ece"],
                "chance": rr["metrics"]["chance"]}
            ens = run_dir(work, f"ens-{name}", c) / "ensemble.json"
            write_ensemble(str(ens), {s: ex[s]["final_checkpoint"] for s in range(k)}, rr["router"],
                           data[(k, emb)][0], c.config_hash(), name=name)
            sources[name] = str(ens)
        arm["train_flops"] = arm["expert_flops"] + arm["router_flops"]
        report_arms[name] = arm
    budget = report_arms["monolith"]["expert_flops"]
    assert all(a["expert_flops"] == budget for a in report_arms.values()), "experts are not FLOP-matched"

    # ---- sample + score ---------------------------------------------------------------------------------
    from archipelago.generate import default_classes

    labels = default_classes(args.n, 10)
    rows: list[dict[str, Any]] = []
    pool = ProcessPoolExecutor(args.jobs, mp_context=ctx)

    row_cache = work / "rows"
    row_cache.mkdir(parents=True, exist_ok=True)

    def row_file(a: str, m: str, g: float) -> Path:
        """A scored row is cached under a key of everything it depends on (the trained models are fingerprinted
        by their final losses, so a retrained arm never reuses an old row): an interrupted run resumes."""
        key = json.dumps([sources[a], report_arms[a]["final_losses"], report_arms[a].get("router_metrics"), m, g,
                          args.n, args.sample_steps, args.seed, args.device, args.boots, scorer.floor],
                         sort_keys=True, default=str)
        return row_cache / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"

    def run_many(specs: list[tuple[str, str, float]]) -> None:
        """Sample and score (arm, mode, cfg) triples not done yet (in this run or a cached one), in parallel."""
        have = {(r_["arm"], r_["mode"], r_["cfg"]) for r_ in rows}
        todo = []
        for a, m, g in dict.fromkeys(specs):
            if (a, m, g) in have:
                continue
            f = row_file(a, m, g)
            if f.exists():
                rows.append({**json.loads(f.read_text()), "cached": True})
            else:
                todo.append((a, m, g))
        futs = [pool.submit(_sample_job, sources[a], m, args.n, g, args.sample_steps, args.seed, args.device)
                for a, m, g in todo]
        for (a, m, g), fut in zip(todo, futs):
            x, cost = fut.result()
            row = {"arm": a, "mode": m, "cfg": g, **scorer(x, labels), **cost}
            rows.append(row)
            tmp = row_file(a, m, g).with_suffix(".tmp")
            tmp.write_text(json.dumps(row))
            tmp.replace(row_file(a, m, g))
            log(f"{a} {m} cfg {g:g}: FD {row['fd']:.2f} ± {row['fd_boot_std']:.2f}, class-cons "
                f"{row['class_consistency']:.3f}, memo {row['memorisation']:.3f}")

    def fd_of(a: str, m: str, g: float) -> float:
        return next(r_["fd"] for r_ in rows if (r_["arm"], r_["mode"], r_["cfg"]) == (a, m, g))

    def bracket_all(pairs: list[tuple[str, str]]) -> None:
        """Bracket several (arm, mode) pairs at once: each round samples every pair's next scale in parallel."""
        run_many([(a, m, g) for a, m in pairs for g in args.cfg_grid])
        open_ = list(pairs)
        while open_:
            nxt = []
            for a, m in open_:
                scales = sorted(r_["cfg"] for r_ in rows if (r_["arm"], r_["mode"]) == (a, m))
                best = min(scales, key=lambda s: fd_of(a, m, s))
                if best == scales[0] and scales[0] > args.cfg_min:
                    nxt.append((a, m, max(args.cfg_min, round(scales[0] - 0.5, 3))))
                elif best == scales[-1] and scales[-1] < args.cfg_max:
                    nxt.append((a, m, min(args.cfg_max, round(scales[-1] * 1.5, 3))))
            run_many(nxt)
            open_ = [(a, m) for a, m, _ in nxt]

    ddm = [n_ for n_ in report_arms if n_ != "monolith"]
    # sample-once ignores the router: one bracket per (K, embedder, protocol), reported for each router.
    once = {}
    for n_ in ddm:
        once.setdefault(n_.rsplit("-", 1)[0], n_)
    bracket_all([("monolith", "-")] + [(n_, "top-1") for n_ in ddm] + [(n_, "sample-once") for n_ in once.values()])
    best_top1 = {n_: min((r_ for r_ in rows if (r_["arm"], r_["mode"]) == (n_, "top-1")), key=lambda r_: r_["fd"])["cfg"]
                 for n_ in ddm}
    # top-2 at the shared scale and at the arm's best top-1 scale; full (K expert calls per step) at the shared one.
    run_many([(n_, "top-2", g) for n_ in ddm for g in sorted({args.cfg_shared, best_top1[n_]})] +
             [(n_, "full", args.cfg_shared) for n_ in ddm if "-batch-" in n_ or args.quick] +
             [(n_, "sample-once", args.cfg_shared) for n_ in once.values()] +
             [(n_, "top-1", args.cfg_shared) for n_ in ddm] + [("monolith", "-", args.cfg_shared)])
    pool.shutdown()
    for n_ in ddm:       # copy the shared sample-once rows to the arms that differ only by router
        src = once[n_.rsplit("-", 1)[0]]
        if src != n_:
            rows.extend({**r_, "arm": n_, "shared_with": src} for r_ in list(rows)
                        if r_["arm"] == src and r_["mode"] == "sample-once")

    # ---- summary: each arm at its own best (any mode, any scale) and at the shared scale -----------------
    def best(arm: str, mode: str | None = None) -> dict[str, Any]:
        cand = [r_ for r_ in rows if r_["arm"] == arm and (mode is None or r_["mode"] == mode)]
        return min(cand, key=lambda r_: r_["fd"])

    summary = []
    for n_, a in report_arms.items():
        b = best(n_)
        shared = [r_ for r_ in rows if r_["arm"] == n_ and r_["cfg"] == args.cfg_shared]
        sb = min(shared, key=lambda r_: r_["fd"])
        summary.append({"arm": n_, "train_flops": a["train_flops"], "best_mode": b["mode"], "best_cfg": b["cfg"],
                        "best_fd": b["fd"], "best_fd_boot_std": b["fd_boot_std"],
                        "best_class_consistency": b["class_consistency"], "best_memorisation": b["memorisation"],
                        "shared_cfg_mode": sb["mode"], "shared_cfg_fd": sb["fd"],
                        "best_by_mode": {m: {"cfg": best(n_, m)["cfg"], "fd": best(n_, m)["fd"]}
                                         for m in sorted({r_["mode"] for r_ in rows if r_["arm"] == n_})}})
    winner = None
    if args.stage == "grid" and ddm:
        # The router that wins: lower mean best-top-1 FD over the grid's arms.
        by_router = {r: np.mean([best(n_, "top-1")["fd"] for n_ in ddm if n_.endswith(f"-{r}")])
                     for r in args.router}
        w = min(by_router, key=by_router.get)
        winner = {"router": w, "mean_best_top1_fd": {r: float(v) for r, v in by_router.items()}}

    result = {
        "benchmark": "ddm_vs_monolithic", "stage": args.stage, "quick": args.quick, "budget_x": args.budget,
        "setup": {"monolith_steps": steps, "monolith_batch": 64, "expert_budget_flops": budget,
                  "protocols": {"batch": "same steps, batch / K per expert (the paper)",
                                "steps": "same batch, steps / K per expert, EMA decay ** K"},
                  "router_flops_charged": True, "n_samples": args.n, "sample_steps": args.sample_steps,
                  "sampler": "euler", "cfg_grid": args.cfg_grid, "cfg_shared": args.cfg_shared,
                  "seed": args.seed, "holdout_fraction": args.holdout,
                  "reference": f"held-out split ({len(scorer.held)} digits, never trained on)",
                  "fd_floor": scorer.floor, "classifier": {k_: scorer.info.get(k_) for k_ in
                                                           ("test_accuracy", "train_accuracy", "steps")}},
        "arms": report_arms, "rows": rows, "summary": summary, "winner": winner, "machine": machine(args.device),
        "train_wall_s": train_wall, "wall_s_total": time.perf_counter() - T0, "created_at": time.time()}
    write_report(args.out, result)
    print_tables(result)
    return 0


def print_tables(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["setup"]
    t = Table(title=f"DDM vs monolith at {result['budget_x']:g}x ({s['expert_budget_flops'] / 1e12:.2f} TFLOPs of "
                    f"experts per arm); held-out FD floor {s['fd_floor']:.2f}")
    for col in ("arm", "TFLOPs", "best mode", "cfg", "FD ↓", "± boot", "class-cons", "memo", "FD @ shared",
                "top-1 best", "sample-once best"):
        t.add_column(col, justify="left" if col in ("arm", "best mode") else "right")
    for r in sorted(result["summary"], key=lambda r: r["best_fd"]):
        bm = r["best_by_mode"]
        t.add_row(r["arm"], f"{r['train_flops'] / 1e12:.2f}", r["best_mode"], f"{r['best_cfg']:g}",
                  f"{r['best_fd']:.2f}", f"{r['best_fd_boot_std']:.2f}", f"{r['best_class_consistency']:.3f}",
                  f"{r['best_memorisation']:.3f}", f"{r['shared_cfg_fd']:.2f}",
                  f"{bm['top-1']['fd']:.2f}@{bm['top-1']['cfg']:g}" if "top-1" in bm else "-",
                  f"{bm['sample-once']['fd']:.2f}@{bm['sample-once']['cfg']:g}" if "sample-once" in bm else "-")
    Console(width=200).print(t)
    rt = Table(title="router accuracy per t-bin (t=0 data, t=1 noise) and class concentration of the shards")
    rt.add_column("arm")
    arms = {n: a for n, a in result["arms"].items() if "router_metrics" in a}
    for b in next(iter(arms.values()))["router_metrics"]["accuracy_per_t_bin"] if arms else []:
        rt.add_column(f"t {b['t'][0]:.1f}-{b['t'][1]:.1f}", justify="right")
    for col in ("alignment", "chance", "class share", "purity"):
        rt.add_column(col, justify="right")
    for n, a in arms.items():
        m = a["router_metrics"]
        rt.add_row(n, *[f"{b['accuracy']:.3f}" for b in m["accuracy_per_t_bin"]], f"{m['alignment']:.3f}",
                   f"{m['chance']:.3f}", f"{a['data']['class_majority_share']:.3f}", f"{a['data']['purity']:.3f}")
    Console(width=200).print(rt)
    if result.get("winner"):
        print(f"router winner (mean best top-1 FD): {result['winner']}")


def plot() -> int:
    """FD at each arm's best vs training FLOPs (router included), one line per arm family over the budgets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(RESULTS.glob("ddm_vs_monolithic*.json"))
    pts: dict[str, list[tuple[float, float, float]]] = {}
    floor = None
    for f in files:
        r = json.loads(f.read_text())
        if r.get("quick") or "summary" not in r:
            continue
        floor = r["setup"]["fd_floor"]
        for s in r["summary"]:
            pts.setdefault(s["arm"], []).append((s["train_flops"], s["best_fd"], s["best_fd_boot_std"] or 0))
    fig, ax = plt.subplots(figsize=(9, 6))
    for arm, p in sorted(pts.items()):
        p.sort()
        x, y, e = zip(*p)
        style = {"lw": 2.5, "color": "black", "marker": "s"} if arm == "monolith" else {"marker": "o", "alpha": 0.8}
        if arm != "monolith" and len(p) == 1:
            style.update(alpha=0.35, ms=4)
        ax.errorbar(x, y, yerr=e, label=arm, capsize=2, **style)
    if floor is not None:
        ax.axhline(floor, ls=":", color="gray", label="real-vs-held-out floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs (experts + router)")
    ax.set_ylabel("held-out FD at each arm's best guidance and routing (lower is better)")
    ax.set_title("DDM vs monolith on the embedded digits")
    ax.legend(fontsize=6, ncol=2)
    out = RESULTS / "ddm_vs_monolithic_fd_vs_flops.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
