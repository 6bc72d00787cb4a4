"""Slow links between real (namespace) hosts: what crosses them and what it costs, for training and inference.

Needs root (Linux network namespaces + tc tbf; see archipelago/cluster/netns.py). A 3-node namespace
cluster; every node's link is shaped to each `--rates` value in turn.

(a) Training, the same total work two ways, each process one CPU thread:
    monolith: one DDP job spanning nodes 1 and 2 (torchrun --nnodes 2, gloo over the shaped links), global
              batch B for S steps on all the data;
    DDM:      two islands, expert k alone on node k+1 with batch B/2 for S steps on its shard; they share
              nothing but the storage (the local disk, as a shared filesystem).
    -> wall time and bytes across each link. The DDM claim: near-zero cross-node traffic while training.
(b) Inference across nodes 1 and 2 (Ray launcher, ranks pinned with node_<i> resources, driver on node 0):
    sync_patch, DistriFusion (warm-up 1), USP as Ulysses 2 and as ring 2, PipeFusion (2 stages x 4 patches):
    latency, rank 0's wait on communication, bytes per step and bytes across the links, PSNR vs sync_patch.
    Which mode for which link class?

    sudo python benchmarks/interconnect.py                          # 50 Mbit/s and 1 Gbit/s
    sudo python benchmarks/interconnect.py --rates 100mbit --steps 40  # quicker
    sudo python benchmarks/interconnect.py --skip-train --merge        # inference only, keep training rows
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "interconnect.json"
INFER_MODEL = {"input_size": 64, "in_channels": 4, "patch_size": 2, "hidden_size": 256, "depth": 8,
               "num_heads": 8, "num_classes": 10, "class_dropout": 0.1}   # 32x32 = 1,024 tokens


def _env(net: Any) -> dict[str, str]:
    return net.driver_env({**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0",
                           "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
                           "TORCH_CPP_LOG_LEVEL": "ERROR"})


def _train_argv(cfg: Path, data: str, out: Path, *sets: str) -> list[str]:
    argv = ["-m", "archipelago.experts.train", "--config", str(cfg), "--shard", "0", "--data", data,
            "--out", str(out), "--progress", "off", "--no-resume"]
    for s in sets:
        argv += ["--set", s]
    return argv


def _wait(procs: list[subprocess.Popen], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"{what}: no result within {timeout_s:.0f}s") from None
    bad = [p for p in procs if p.returncode != 0]
    if bad:
        err = bad[0].stderr.read() if bad[0].stderr else ""
        raise SystemExit(f"{what} failed (exit {bad[0].returncode}): {err.strip().splitlines()[-3:]}")


def train_arms(net: Any, work: Path, steps: int, batch: int, timeout_s: float) -> dict[str, Any]:
    """(a): monolith DDP across nodes 1+2 vs two single-process islands on nodes 1 and 2."""
    from archipelago.config import load_config
    from archipelago.data.prepare import prepare_data

    common = [f"expert.steps={steps}", f"expert.checkpoint_every={steps}", "expert.log_every=10",
              "tracking.enabled=false"]
    cfg_path = REPO / "configs" / "digits-quickstart.yaml"
    data = {}
    for k in (1, 2):
        url = str(work / f"data-k{k}")
        if not Path(url, "manifest.json").exists():
            prepare_data(load_config(cfg_path, [f"data.num_clusters={k}"]).data, url, progress=False)
        data[k] = url
    env, py = _env(net), sys.executable
    out: dict[str, Any] = {}

    # monolith: DDP, 2 ranks on 2 nodes, global batch `batch`
    port = 29400 + int(time.time()) % 500
    tag = f"s{steps}-{int(time.time())}"
    with net.phase(f"train-monolith-{tag}") as moved:
        t0 = time.perf_counter()
        procs = [subprocess.Popen(
            net.exec_argv(node, [py, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                                 str(node - 1), "--nproc-per-node", "1", "--master-addr", net.node_ip(1),
                                 "--master-port", str(port),
                                 *_train_argv(cfg_path, data[1], work / f"mono-{tag}", *common,
                                              f"expert.batch_size={batch}", "expert.strategy=ddp")]),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for node in (1, 2)]
        _wait(procs, "monolith DDP", timeout_s)
        wall = time.perf_counter() - t0
    out["monolith_ddp"] = {"wall_s": wall, "links": _links(moved), "world_size": 2, "global_batch": batch,
                           "steps": steps, "final_loss": _final_loss(work / f"mono-{tag}")}

    # DDM: expert k on node k+1, batch/2 each, no process group at all
    with net.phase(f"train-ddm-{tag}") as moved:
        t0 = time.perf_counter()
        procs = []
        for k in (0, 1):
            argv = _train_argv(cfg_path, data[2], work / f"ddm-{tag}-{k}", *common,
                               f"expert.batch_size={batch // 2}", "expert.strategy=single")
            argv[argv.index("--shard") + 1] = str(k)
            procs.append(subprocess.Popen(net.exec_argv(k + 1, [py, *argv]), env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        _wait(procs, "DDM islands", timeout_s)
        wall = time.perf_counter() - t0
    out["ddm_islands"] = {"wall_s": wall, "links": _links(moved), "islands": 2, "batch_per_island": batch // 2,
                          "steps": steps, "final_loss": [_final_loss(work / f"ddm-{tag}-{k}") for k in (0, 1)]}
    return out


def _final_loss(run: Path) -> float | None:
    try:
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        return float(rows[-1]["loss"])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _links(moved: dict[int, Any]) -> dict[str, dict[str, int]]:
    return {f"node_{i}": {"sent": b.sent, "received": b.received} for i, b in sorted(moved.items())}


# ----------------------------------------------------------------------------------------------------
# (b) inference: runs as a driver inside node 0 (`--driver`), prints one JSON line
# ----------------------------------------------------------------------------------------------------

# Inference layouts across the two nodes (one rank each): the exact ones, then the stale-K/V ones
INFER_MODES: dict[str, dict[str, Any]] = {
    "sync_patch": {"mode": "sync_patch"},
    "distrifusion": {"mode": "distrifusion", "warmup_steps": 1, "comm_group_layers": 1},
    "usp (ulysses 2 x ring 1)": {"mode": "usp", "ulysses_degree": 2, "ring_degree": 1},
    "usp (ulysses 1 x ring 2)": {"mode": "usp", "ulysses_degree": 1, "ring_degree": 2},
    "pipefusion (M=4)": {"mode": "pipefusion", "warmup_steps": 1, "pipe_patches": 4},
}


def driver(args: argparse.Namespace) -> int:
    """Inside node 0: Ray launcher, ranks pinned to nodes 1 and 2; one mode, once warm, then timed; rank 0's
    samples go to --driver-samples (the parent compares the modes)."""
    import ray
    import torch

    from archipelago.experts.checkpoint import save_for_inference
    from archipelago.experts.dit import DiT
    from archipelago.inference.config import ParallelConfig
    from archipelago.inference.ray_launcher import launch_ray
    from archipelago.inference.runner import SamplingSpec, write_samples

    sys.path.insert(0, str(REPO / "benchmarks"))
    from parallel_inference import perturbed

    url = args.driver_expert
    if not Path(url, "meta.json").exists():
        save_for_inference(perturbed(DiT(**INFER_MODEL), seed=0), url)
    spec = SamplingSpec(experts=[url], num_samples=2, steps=args.infer_steps, device="cpu", seed=0)
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level="ERROR")
    pcfg = ParallelConfig(world_size=2, **INFER_MODES[args.driver_mode])
    res = launch_ray(spec, pcfg, env={"GLOO_SOCKET_IFNAME": "eth0"}, rank_resources=["node_1", "node_2"],
                     warmup_runs=1, timeout_s=1800)
    r0 = res[0]
    write_samples(torch.as_tensor(r0.samples), args.driver_samples)
    print("RESULT " + json.dumps({
        "describe": pcfg.describe(), "latency_s": max(r.latency_s for r in res),
        "bytes_per_step_rank0": r0.comm.get("total_bytes", 0) / spec.steps,
        "bytes_per_step_all_ranks": sum(r.comm.get("total_bytes", 0) for r in res) / spec.steps,
        "comm_wait_s_rank0": sum(c["seconds"] for c in r0.comm.get("by_type", {}).values()),
        "comm_by_type_rank0": r0.comm.get("by_type", {})}), flush=True)
    return 0


def infer_arms(net: Any, work: Path, steps: int, timeout_s: float, modes: list[str]) -> dict[str, Any]:
    """(b): one driver per mode, each in its own link-counting phase (bytes across links per mode, warm-up
    and timed run together, plus Ray's own traffic); PSNR of each mode vs sync_patch's samples."""
    from archipelago.eval.fidelity import psnr
    from archipelago.inference.runner import read_samples

    rows: dict[str, Any] = {}
    t0 = time.perf_counter()
    for mode in modes:
        samples = work / f"samples-{len(rows)}.safetensors"
        with net.phase(f"infer-{len(rows)}-{time.time()}") as moved:
            proc = subprocess.run(net.exec_argv(0, [sys.executable, str(Path(__file__).resolve()), "--driver",
                                                    "--driver-expert", str(work / "infer-expert"),
                                                    "--driver-mode", mode, "--driver-samples", str(samples),
                                                    "--infer-steps", str(steps)]),
                                  env=_env(net), capture_output=True, text=True, timeout=timeout_s, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"inference driver ({mode}) failed (exit {proc.returncode}): "
                             f"{proc.stderr.strip().splitlines()[-5:]}")
        rows[mode] = {**json.loads(lines[-1][len("RESULT "):]), "links": _links(moved),
                      "_samples": read_samples(str(samples))}
    ref = rows[modes[0]]["_samples"]
    for r in rows.values():
        p = psnr(r.pop("_samples"), ref)
        r["psnr_vs_sync_db"] = "inf" if p == float("inf") else p
    return {"modes": rows, "wall_s_incl_start": time.perf_counter() - t0, "steps": steps,
            "tokens": (INFER_MODEL["input_size"] // INFER_MODEL["patch_size"]) ** 2}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", nargs="+", default=["50mbit", "1gbit"])
    ap.add_argument("--steps", type=int, default=60, help="(a) optimizer steps of each arm")
    ap.add_argument("--batch", type=int, default=64, help="(a) global batch of the monolith (islands: half)")
    ap.add_argument("--infer-steps", type=int, default=4, help="(b) sampler steps")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-infer", action="store_true")
    ap.add_argument("--modes", nargs="+", default=list(INFER_MODES), choices=list(INFER_MODES),
                    help="(b) inference layouts; the first is the PSNR reference")
    ap.add_argument("--merge", action="store_true", help="keep the rows of the existing --out file that this "
                    "run skips (e.g. --skip-train: the training rows of the last full run)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--driver-expert", help=argparse.SUPPRESS)
    ap.add_argument("--driver-mode", help=argparse.SUPPRESS)
    ap.add_argument("--driver-samples", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.driver:
        return driver(args)

    from bench_common import machine, write_report

    from archipelago.cluster.netns import NetnsCluster, NetnsConfig

    info = machine()
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="arch-interconnect-") as tmp, \
            NetnsCluster(NetnsConfig(nodes=3, link_rate=args.rates[0], num_cpus=1)) as net:
        work = Path(tmp)
        for rate in args.rates:
            net.shape(rate)
            print(f"-- links at {rate}", flush=True)
            row: dict[str, Any] = {}
            if not args.skip_train:
                row["train"] = train_arms(net, work, args.steps, args.batch, timeout_s=1800)
                for arm, r in row["train"].items():
                    moved = sum(v["sent"] + v["received"] for v in r["links"].values())
                    print(f"   train {arm:<13} {r['wall_s']:7.1f} s   {moved / 2**20:9.2f} MiB across links",
                          flush=True)
            if not args.skip_infer:
                row["infer"] = infer_arms(net, work, args.infer_steps, timeout_s=1800, modes=args.modes)
                for mode, r in row["infer"]["modes"].items():
                    moved = sum(v["sent"] + v["received"] for v in r["links"].values())
                    print(f"   infer {mode:<18} {r['latency_s']:7.2f} s   rank-0 wait {r['comm_wait_s_rank0']:6.2f} s"
                          f"   {r['bytes_per_step_rank0'] / 2**20:7.2f} MiB/step rank0   {moved / 2**20:8.1f} MiB "
                          f"across links   PSNR vs sync {r['psnr_vs_sync_db']}", flush=True)
            results[rate] = row
    report = {"benchmark": "interconnect", "created_at": time.time(), "machine": info,
              "loadavg_at_end": os.getloadavg(), "wall_s": time.perf_counter() - t_start, "settings": vars(args),
              "rates": results, "infer_model": INFER_MODEL}
    if args.merge and Path(args.out).exists():
        report = merged(json.loads(Path(args.out).read_text()), report)
    report["table_md"] = table(report["rates"])
    print("\n" + report["table_md"])
    write_report(args.out, report)
    return 0


def merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new`, with each rate's sections it lacks (train / infer) taken from `old`; `carried_over` names them
    and when `old` ran."""
    carried = {}
    for rate, row in new["rates"].items():
        for section in ("train", "infer"):
            if section not in row and section in old.get("rates", {}).get(rate, {}):
                row[section] = old["rates"][rate][section]
                carried.setdefault(rate, {})[section] = old["created_at"]
    return {**new, "carried_over": carried}


def table(results: dict[str, Any]) -> str:
    lines = ["| link | what | wall / latency s | MiB across links (all nodes) | note |", "|---|---|---|---|---|"]
    for rate, row in results.items():
        for arm, r in (row.get("train") or {}).items():
            moved = sum(v["sent"] + v["received"] for v in r["links"].values()) / 2**20
            lines.append(f"| {rate} | train: {arm} | {r['wall_s']:.1f} | {moved:.2f} | final loss "
                         f"{r['final_loss']} |")
        for mode, r in ((row.get("infer") or {}).get("modes") or {}).items():
            links = r.get("links")
            mib = (sum(v["sent"] + v["received"] for v in links.values()) / 2**20 if links
                   else r.get("mib_across_links_all_nodes"))
            across = "" if mib is None else f"{mib:.1f} in all; "
            lines.append(f"| {rate} | infer: {mode} (2 nodes) | {r['latency_s']:.2f} | {across}"
                         f"{r['bytes_per_step_rank0'] / 2**20:.2f} per step (rank 0 received) | rank-0 comm wait "
                         f"{r['comm_wait_s_rank0']:.2f} s, PSNR vs sync {r['psnr_vs_sync_db']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
