"""The one prepared GPU check: everything a lent GPU should measure, in one run of about 8.5 minutes (H200).

A GPU is lent now and then for ~15 minutes, start-up included, on a bare machine that cannot reach the
internet. So this script sets itself up (installs this checkout against the CUDA torch it finds there),
runs each part in its own try block and writes the JSON after every part (a failing or killed part still
leaves the others' numbers and its own error), and stops starting new work at its own deadline.

Parts
  env       GPU model, driver, CUDA / torch / NCCL versions, bf16 support.
  train     every strategy at world size 1 (single, ddp, fsdp2, deepspeed ZeRO-1/2/3): N steps, the final
            checkpoint reloaded, loss falls, step time, MFU (eval/flops.py), the dtype the matmuls ran in;
            then single fp32 vs bf16 vs bf16 + torch.compile. Each run is its own process (DeepSpeed keeps
            global state; one crash must not take the others).
  sampling  images/s for one expert and the ensemble full / top-2 / top-1, at 16x16 and a larger DiT.
  ddm       (--ddm) the DDM-vs-monolith curve stage at --ddm-budget x through its --device cuda path,
            time-boxed by the deadline.

On the device machine (repo root, results under $OUT):
    python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json [--ddm]
Missing pure-Python dependencies travel as wheels in .whl/ (see docs/benchmarks.md); they are installed
first. On CPU, in seconds, with tiny sizes (what the test runs):
    python benchmarks/gpu_check.py --dry-run
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STRATEGIES = [("single", None), ("ddp", None), ("fsdp2", None), ("deepspeed", 1), ("deepspeed", 2),
              ("deepspeed", 3)]
# Dense peak FLOP/s from the vendors' data sheets, for MFU only (not results): {name part: {dtype: flops}}.
PEAK_FLOPS = {"H200": {"bf16": 989e12, "fp32": 67e12}, "H100": {"bf16": 989e12, "fp32": 67e12},
              "A100": {"bf16": 312e12, "fp32": 19.5e12}, "L40S": {"bf16": 362e12, "fp32": 91.6e12}}
# Sizes: (real GPU run, --dry-run on CPU)
SIZES = {
    "train": ({"image_size": 32, "hidden_size": 384, "depth": 12, "num_heads": 6, "batch_size": 256, "steps": 50},
              {"image_size": 8, "hidden_size": 32, "depth": 2, "num_heads": 2, "batch_size": 16, "steps": 4}),
    "sample_small": ({"input_size": 16, "hidden_size": 128, "depth": 4, "num_heads": 4, "n": 256, "steps": 32},
                     {"input_size": 8, "hidden_size": 32, "depth": 1, "num_heads": 2, "n": 4, "steps": 2}),
    "sample_large": ({"input_size": 64, "hidden_size": 768, "depth": 12, "num_heads": 12, "n": 64, "steps": 32},
                     {"input_size": 16, "hidden_size": 32, "depth": 1, "num_heads": 2, "n": 2, "steps": 2}),
}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# Setup on a bare machine
# ----------------------------------------------------------------------------------------------------

def setup(dry_run: bool) -> dict[str, Any]:
    """Make `import archipelago` work against the torch already installed (never replace a CUDA torch)."""
    import torch

    print(f"torch {torch.__version__}  cuda available: {torch.cuda.is_available()}", flush=True)
    out: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if dry_run:
        return out
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if wheels:   # pure-Python dependencies carried from a machine with a registry (docs/benchmarks.md)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                            *map(str, wheels)], check=False, capture_output=True, text=True)
        out["wheels"] = {"count": len(wheels), "rc": r.returncode, "stderr": r.stderr[-2000:]}
    try:
        importlib.import_module("archipelago")
    except ImportError:
        # --no-deps: pip must not try to fetch anything (there is no network) nor touch the CUDA torch.
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "-e", str(REPO)], check=False, capture_output=True, text=True)
        out["install"] = {"rc": r.returncode, "stderr": r.stderr[-2000:]}
        # An install that failed (no build backend there) still works from the checkout, here and in workers.
        sys.path.insert(0, str(REPO))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    missing = []
    for mod in ("pydantic", "yaml", "safetensors", "fsspec", "sklearn", "deepspeed", "typer", "rich", "PIL"):
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(mod)
    out["missing_modules"] = missing
    if missing:
        log(f"missing modules (parts that need them will fail and say so): {missing}")
    return out


# Imported on the training/sampling path but absent from the GPU image (/work/.library/device/KINDS.md): they
# travel as wheels. DeepSpeed publishes only an sdist: it is built here into a pure-Python wheel.
DEVICE_WHEELS = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "hjson"]


def download_wheels(dest: Path) -> int:
    """Fill `dest` (.whl/) with the wheels the GPU machine lacks, for Python 3.12 on x86-64 (its image)."""
    from importlib.metadata import version

    dest.mkdir(exist_ok=True)
    plat = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
            for a in ("--platform", p)]
    pins = [f"{name}=={version(name)}" for name in DEVICE_WHEELS]
    rc = subprocess.call([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                          "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(dest), *pins])
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    rc |= subprocess.call([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                           str(dest), f"deepspeed=={version('deepspeed')}"], env=env)
    print(f"wheels in {dest}: {sorted(p.name for p in dest.glob('*.whl'))}")
    return rc


def env_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    bf16_supported=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               check=False, capture_output=True, text=True, timeout=20)
            info["driver"] = r.stdout.strip() or r.stderr.strip()[-200:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["driver"] = f"unknown ({exc})"
    return info


def peak_flops(precision: str) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks[precision]
    return None


# ----------------------------------------------------------------------------------------------------
# train: one run per process (`--worker train`)
# ----------------------------------------------------------------------------------------------------

def train_worker(args: argparse.Namespace) -> None:
    """One training run, its checkpoint reloaded; writes a JSON dict to args.result."""
    import torch

    from archipelago.config import ArchipelagoConfig
    from archipelago.eval.flops import dit_forward_flops
    from archipelago.experts.callbacks import TrainCallback
    from archipelago.experts.checkpoint import load_expert
    from archipelago.experts.train import train_expert

    size = SIZES["train"][1 if args.dry_run else 0]
    expert = {k: size[k] for k in ("hidden_size", "depth", "num_heads", "batch_size", "steps")}
    expert.update(strategy=args.strategy, precision=args.precision, compile=bool(args.compile), patch_size=2,
                  warmup_steps=min(10, size["steps"] // 2), lr=1e-3, log_every=1, checkpoint_every=10**6,
                  ema_decay=0.99, seed=0)
    if args.zero_stage:
        expert["zero_stage"] = args.zero_stage
    cfg = ArchipelagoConfig.model_validate({"name": "gpu-check", "expert": expert,
                                            "data": {"image_size": size["image_size"], "num_clusters": 1}})

    class Probe(TrainCallback):
        """The dtype the Linear layers really produced (bf16 must show up as bf16 inside every strategy)."""

        def __init__(self) -> None:
            self.dtypes: set[str] = set()
            self.losses: list[float] = []
            self.step_times: list[float] = []

        def on_start(self, info: dict[str, Any]) -> None:
            for m in info["model"].modules():
                if isinstance(m, torch.nn.Linear):
                    m.register_forward_hook(lambda mod, a, out: self.dtypes.add(str(out.dtype)))

        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            self.losses.append(metrics["loss"])
            self.step_times.append(metrics["step_time_s"])

    probe = Probe()
    out_dir = Path(args.work) / "run"
    t0 = time.perf_counter()
    result = train_expert(cfg, 0, args.data, str(out_dir), callbacks=[probe], resume=False)
    wall = time.perf_counter() - t0
    model, meta = load_expert(result["final_checkpoint"], device="cuda" if torch.cuda.is_available() else "cpu")
    n = len(probe.losses)
    k = max(1, n // 5)
    first, last = sum(probe.losses[:k]) / k, sum(probe.losses[-k:]) / k
    steady = sorted(probe.step_times[min(5, n - 1):] or probe.step_times)   # compile / warm-up excluded
    step_s = steady[len(steady) // 2]
    flops_per_step = 3 * dit_forward_flops(model.config_dict) * cfg.expert.batch_size
    peak = peak_flops("bf16" if args.precision == "bf16" else "fp32")
    with torch.no_grad():
        x = torch.randn(2, *meta["image_shape"], device=next(model.parameters()).device)
        finite = bool(torch.isfinite(model(x, torch.rand(2, device=x.device),
                                           torch.zeros(2, dtype=torch.long, device=x.device))).all())
    Path(args.result).write_text(json.dumps({
        "strategy": args.strategy, "zero_stage": args.zero_stage, "precision": args.precision,
        "compile": bool(args.compile), "steps": result["steps"], "batch_size": cfg.expert.batch_size,
        "params": sum(p.numel() for p in model.parameters()), "loss_first": first, "loss_last": last,
        "loss_falls": last < first, "step_time_s_median": step_s, "samples_per_s": cfg.expert.batch_size / step_s,
        "first_step_s": probe.step_times[0] if probe.step_times else None, "wall_s": wall,
        "checkpoint_s": result["checkpoint_s"], "reloaded": finite and meta["step"] == result["steps"],
        "meta_precision": meta["expert"]["precision"], "meta_compile": meta["expert"]["compile"],
        "linear_out_dtypes": sorted(probe.dtypes), "model_flops_per_step": flops_per_step,
        "achieved_tflops": flops_per_step / step_s / 1e12, "peak_tflops_spec": peak / 1e12 if peak else None,
        "mfu": flops_per_step / step_s / peak if peak else None}))


def train_arms(args: argparse.Namespace) -> list[tuple[str, str, int | None, str, int]]:
    """(name, strategy, zero stage, precision, compiled) of each train arm this run takes; --arms filters them
    (a rerun of the arms an earlier run left: its deadline, a crash) and an unknown name stops the run at once."""
    # deepspeed bf16: the Linear dtypes show whether its torch_autocast section really carried bf16 on CUDA
    # fsdp2 bf16 eager beside compiled: the H200 run found compiled FSDP2 bf16 4.5x slower than single compiled
    arms = [(s, z, "fp32", 0) for s, z in STRATEGIES] + [("single", None, "bf16", 0), ("deepspeed", 2, "bf16", 0),
                                                        ("fsdp2", None, "bf16", 0), ("single", None, "bf16", 1),
                                                        ("fsdp2", None, "bf16", 1)]   # compiled blocks, sharded
    if args.dry_run and not args.dry_run_compile:
        arms = [a for a in arms if not a[3]]   # inductor on 2 CPU cores takes minutes; the GPU run compiles
    named = [(f"{s}{'-zero' + str(z) if z else ''}-{p}{'-compile' if c else ''}", s, z, p, c) for s, z, p, c in arms]
    if args.arms:
        unknown = sorted(set(args.arms) - {n for n, *_ in named})
        if unknown:
            raise SystemExit(f"--arms: unknown {unknown}; choose from {[n for n, *_ in named]}")
        named = [a for a in named if a[0] in args.arms]
    return named


def part_train(args: argparse.Namespace, deadline: float, work: Path) -> dict[str, Any]:
    from archipelago.config import DataConfig
    from archipelago.data.prepare import prepare_data

    size = SIZES["train"][1 if args.dry_run else 0]
    data = work / "data"
    prepare_data(DataConfig(image_size=size["image_size"], num_clusters=1, holdout_fraction=0.0), str(data),
                 progress=False)
    runs: list[dict[str, Any]] = []
    for name, strategy, zero, precision, compiled in train_arms(args):
        left = deadline - time.monotonic()
        if left < 20:
            runs.append({"name": name, "skipped": "deadline"})
            continue
        result = work / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "train", "--strategy", strategy,
               "--precision", precision, "--compile", str(compiled), "--data", str(data),
               "--work", str(work / name), "--result", str(result)]
        if zero:
            cmd += ["--zero-stage", str(zero)]
        if args.dry_run:
            cmd.append("--dry-run")
        log(f"train {name}")
        t0 = time.perf_counter()
        try:
            env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                                 "MASTER_ADDR", "MASTER_PORT")}
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                                  timeout=min(left, 240), env=env)
            if proc.returncode == 0 and result.exists():
                runs.append({"name": name, **json.loads(result.read_text())})
            else:
                runs.append({"name": name, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]})
        except subprocess.TimeoutExpired:
            runs.append({"name": name, "error": f"timed out after {time.perf_counter() - t0:.0f}s"})
        log(f"  {json.dumps(runs[-1])[:300]}")
    return {"sizes": size, "runs": runs}


# ----------------------------------------------------------------------------------------------------
# sampling throughput
# ----------------------------------------------------------------------------------------------------

def part_sampling(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    import torch

    from archipelago.ensemble import Ensemble
    from archipelago.experts.dit import DiT
    from archipelago.generate import generate
    from archipelago.router.model import Router

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows: list[dict[str, Any]] = []
    for label in ("sample_small", "sample_large"):
        s = SIZES[label][1 if args.dry_run else 0]
        torch.manual_seed(0)
        experts = [DiT(input_size=s["input_size"], in_channels=4 if label == "sample_large" else 1, patch_size=2,
                       hidden_size=s["hidden_size"], depth=s["depth"], num_heads=s["num_heads"], num_classes=10)
                   .to(device).eval() for _ in range(4)]
        router = Router(experts[0].in_channels, s["input_size"], num_experts=4, num_classes=10).to(device).eval()
        cases: list[tuple[str, torch.nn.Module]] = [("one_expert", experts[0])]
        cases += [(f"ensemble_{m}", Ensemble(experts, router, mode=m).eval()) for m in ("full", "top-2", "top-1")]
        for name, model in cases:
            if time.monotonic() > deadline - 10:
                rows.append({"size": label, "model": name, "skipped": "deadline"})
                continue
            try:
                with torch.no_grad():
                    generate(model, s["n"], steps=2, device=device)          # warm-up (allocations, cuBLAS)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    generate(model, s["n"], steps=s["steps"], cfg_scale=1.0, device=device)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                rows.append({"size": label, "model": name, "resolution": s["input_size"], "n": s["n"],
                             "steps": s["steps"], "seconds": dt, "images_per_s": s["n"] / dt})
            except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                rows.append({"size": label, "model": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
            log(f"sampling {json.dumps(rows[-1])[:200]}")
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------------
# DDM curve through its --device cuda path
# ----------------------------------------------------------------------------------------------------

def part_ddm(args: argparse.Namespace, deadline: float, work: Path, out_dir: Path) -> dict[str, Any]:
    left = deadline - time.monotonic()
    if left < 60:
        return {"skipped": "deadline"}
    report = out_dir / f"ddm_curve_{args.ddm_budget:g}x.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "ddm_vs_monolithic.py"), "--stage", "curve",
           "--budget", str(args.ddm_budget), "--device", "cuda" if not args.dry_run else "cpu",
           "--work", str(work / "ddm"), "--out", str(report), "--jobs", "1", "--k", "4"]
    if not (RESULTS / "ddm_vs_monolithic.json").exists():
        cmd += ["--curve-router", "xty"]
    if args.dry_run:
        cmd.append("--quick")
    log(f"ddm: {' '.join(cmd[1:])} (time box {left:.0f}s)")
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=left - 10)
    except subprocess.TimeoutExpired:
        return {"cmd": cmd[1:], "error": f"time box of {left - 10:.0f}s reached"}
    out: dict[str, Any] = {"cmd": cmd[1:], "rc": proc.returncode, "stderr": proc.stderr[-2000:]}
    if report.exists():
        out["report"] = str(report)
        out["result"] = json.loads(report.read_text())
    return out


# ----------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------

def table(report: dict[str, Any]) -> str:
    """The report as two plain tables (train arms, sampling rows); errors and skips say so in their row."""
    env = report.get("parts", {}).get("env", {})
    head = f"{env.get('gpu', 'no GPU')} | torch {env.get('torch')} | CUDA {env.get('cuda_runtime')}"
    cols = f"{'train arm':<24}{'step s':>9}{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'loss':>16}  reloaded  linear dtype"
    lines = [f"{head} | driver {env.get('driver')}", "", cols]
    for r in report.get("parts", {}).get("train", {}).get("runs", []):
        if "error" in r or "skipped" in r:
            lines.append(f"{r['name']:<24}{r.get('error') or 'skipped: ' + r['skipped']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(f"{r['name']:<24}{r['step_time_s_median']:>9.4f}{r['samples_per_s']:>11.0f}"
                     f"{r['achieved_tflops']:>9.1f}{mfu:>7}{r['loss_first']:>8.3f}>{r['loss_last']:<7.3f}"
                     f"  {r['reloaded']!s:<8}  {','.join(d.replace('torch.', '') for d in r['linear_out_dtypes'])}")
    lines += ["", f"{'sampling':<14}{'model':<16}{'res':>5}{'n':>5}{'steps':>7}{'seconds':>9}{'images/s':>10}"]
    for r in report.get("parts", {}).get("sampling", {}).get("rows", []):
        if "images_per_s" not in r:
            lines.append(f"{r['size']:<14}{r['model']:<16}{r.get('error') or 'skipped: ' + r.get('skipped', '?')}")
            continue
        lines.append(f"{r['size']:<14}{r['model']:<16}{r['resolution']:>5}{r['n']:>5}{r['steps']:>7}"
                     f"{r['seconds']:>9.3f}{r['images_per_s']:>10.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default=None, help="Report JSON (default: benchmarks/results/gpu_check.json; "
                    "--dry-run: a temporary file).")
    ap.add_argument("--deadline-s", type=float, default=480.0, help="No part starts after this many seconds.")
    ap.add_argument("--dry-run", action="store_true", help="Same code paths on CPU, tiny sizes, in seconds.")
    ap.add_argument("--dry-run-compile", action="store_true", help="--dry-run also runs the compiled arm.")
    ap.add_argument("--parts", nargs="+", default=["train", "sampling"], choices=["train", "sampling", "ddm"])
    ap.add_argument("--arms", nargs="+", default=None, help="Only these train arms (names as in the report, "
                    "e.g. fsdp2-bf16-compile).")
    ap.add_argument("--ddm", action="store_true", help="Also run the DDM curve stage (time-boxed).")
    ap.add_argument("--ddm-budget", type=float, default=16.0, help="Budget multiple of the DDM curve point.")
    ap.add_argument("--download-wheels", action="store_true", help="Here, with a registry: put the wheels the "
                    "GPU image lacks into .whl/ (carry it to the device run), then exit.")
    # --worker train (internal: one training run per process)
    ap.add_argument("--worker", choices=["train"], help=argparse.SUPPRESS)
    for flag in ("--strategy", "--precision", "--data", "--work", "--result"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--compile", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--zero-stage", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--show", metavar="REPORT", default=None, help="Print the tables of a report JSON and exit.")
    args = ap.parse_args(argv)
    if args.show:
        print(table(json.loads(Path(args.show).read_text())))
        return 0
    if args.worker == "train":
        train_worker(args)
        return 0
    if args.download_wheels:
        return download_wheels(REPO / ".whl")
    if "train" in args.parts:
        train_arms(args)          # a mistyped --arms fails here, before setup spends the lent GPU's minutes

    t_start = time.monotonic()
    deadline = t_start + args.deadline_s
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu-check-")) / "gpu_check.json"
                                           if args.dry_run else RESULTS / "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "deadline_s": args.deadline_s, "parts": {}}

    def save() -> None:
        report["elapsed_s"] = time.monotonic() - t_start
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        tmp.replace(out)

    def run_part(name: str, fn: Any) -> None:
        log(f"part {name} ({deadline - time.monotonic():.0f}s left)")
        t0 = time.perf_counter()
        try:
            report["parts"][name] = {**fn(), "seconds": time.perf_counter() - t0}
        except Exception as exc:  # noqa: BLE001 - one failing part still leaves the JSON and the others
            report["parts"][name] = {"error": f"{type(exc).__name__}: {exc}"[:1000],
                                     "traceback": traceback.format_exc()[-3000:],
                                     "seconds": time.perf_counter() - t0}
        save()

    run_part("setup", lambda: setup(args.dry_run))
    run_part("env", env_info)
    with tempfile.TemporaryDirectory(prefix="gpu-check-work-") as tmp:
        work = Path(tmp)
        if "train" in args.parts:
            run_part("train", lambda: part_train(args, deadline, work))
        if "sampling" in args.parts:
            run_part("sampling", lambda: part_sampling(args, deadline))
        if args.ddm or "ddm" in args.parts:
            run_part("ddm", lambda: part_ddm(args, deadline, work, out.parent))
    save()
    print(table(report))
    log(f"wrote {out} in {time.monotonic() - t_start:.0f}s")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
