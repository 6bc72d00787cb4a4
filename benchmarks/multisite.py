"""Islands in separate datacenters: what the WAN costs, what crosses it, and what losing a site costs.

Needs root (archipelago/cluster/multisite.py). One testbed: 2 sites x 2 nodes (1 CPU each), each site its own
Ray cluster behind a WAN link to the services namespace (moto_server S3 + `mlflow server` + the driver).
For each WAN rate (tbf, both directions):

  two sites   `archipelago train`, island k submitted as a Ray job to site k's dashboard
  one site    the same islands, both submitted to site 0 (its 2 nodes run them side by side)
  -> pipeline wall (driver's), island wall, bytes across the WAN by kind: S3 (data in, checkpoints and
     metrics out), MLflow, Ray job control (submission + polling), other -- from per-kind tc class counters.

Then, at the first rate, the cost of losing a site: the two-site run again with on_site_loss=resubmit, site 0
killed whole once island 0 has committed --kill-after-step; island 0 resumes on site 1. Steps redone =
steps island 0 ran past its last commit before the kill (estimated from its throughput and the time between
seeing the commit and the kill) -- the commit it resumes from is exact; extra wall = vs the two-site run.

    sudo python benchmarks/multisite.py                       # 50 Mbit/s and 1 Gbit/s
    sudo python benchmarks/multisite.py --rates 50mbit --steps 200
  sudo python benchmarks/multisite.py --loss-only            # the site-loss arm + its baseline only

The machine's load average is recorded: on a shared 2-core machine the walls are upper bounds.
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

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "multisite.json"
READ = """
import json, sys
from archipelago import storage
root = sys.argv[1]
summary = storage.read_json(storage.join(root, "pipeline.json"))
out = {"islands": summary["islands"], "stages": summary["stages"], "ok": summary["ok"], "ckpt_bytes": {}}
for isl in summary["islands"]:
    final = storage.join(root, "experts", f"expert-{isl['shard']}", "final")
    meta = storage.read_json(storage.join(final, "meta.json"))
    out["ckpt_bytes"][isl["name"]] = sum(len(storage.read_bytes(storage.join(final, f))) for f in meta["files"])
    out.setdefault("start_steps", {})[isl["name"]] = (meta.get("metrics") or {}).get("start_step")
rows = [json.loads(x) for x in storage.read_text(storage.join(root, "experts/expert-1/metrics.jsonl")).splitlines()]
span = [r for r in rows if "time" in r]
out["steps_per_s_island1"] = ((span[-1]["step"] - span[0]["step"]) / (span[-1]["time"] - span[0]["time"])
                              if len(span) > 1 and span[-1]["time"] > span[0]["time"] else None)
print("RESULT " + json.dumps(out))
"""
WATCH = """
import sys, time
from archipelago import storage
ckpts, after = sys.argv[1], int(sys.argv[2])
fs = storage.filesystem(ckpts)[0]
while True:
    fs.invalidate_cache()          # s3fs caches listings: without this a new checkpoint is never seen
    names = storage.listdir(ckpts) if storage.exists(ckpts) else []
    done = [int(n.split("-")[-1]) for n in names if storage.exists(storage.join(ckpts, n, "meta.json"))]
    if done and max(done) >= after:
        print("committed", max(done), time.time(), flush=True)
        break
    time.sleep(0.2)
"""


def _config(args: argparse.Namespace, root: str, **islands: Any) -> dict[str, Any]:
    return {"name": "multisite-bench",
            "data": {"image_size": 16, "num_clusters": 2, "seed": 0},
            "expert": {"hidden_size": args.hidden, "depth": args.depth, "num_heads": 4, "patch_size": 2,
                       "steps": args.steps, "batch_size": 32, "warmup_steps": 5, "checkpoint_every": args.every,
                       "log_every": 20, "sample_steps": 4, "seed": 0, "lease_ttl_s": 6.0},
            "router": {"hidden_size": 16, "depth": 1, "steps": 20, "batch_size": 32},
            "islands": {"flop_match": "none", "max_failures": 0, "site_loss_timeout_s": 5.0, **islands},
            "inference": {"num_samples": 8, "routing": "top-1"},
            "tracking": {"enabled": True, "experiment": "multisite-bench"},
            "storage": {"root": root}}


def run_arm(tb: Any, work: Path, name: str, cfg: dict[str, Any], addresses: list[str], rate: str,
            kill: tuple[int, int] | None = None, kill_mode: str = "hard") -> dict[str, Any]:
    """One `archipelago train` from the services namespace; WAN counters from zero. kill=(site, step): lose
    that site once island 0 committed that step."""
    tb.shape_wan(rate)                                      # also restarts the per-kind counters
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = tb.driver_env({**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    argv = [sys.executable, "-m", "archipelago.cli", "train", "--config", str(path), "--verbose"]
    for k, address in enumerate(addresses):
        argv += ["--set", f"islands.per_island.{k}.address={address}"]
    log = work / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        driver = subprocess.Popen(tb.exec_argv(argv), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    loss: dict[str, Any] = {}
    if kill is not None:
        site, step = kill
        ckpts = f"{cfg['storage']['root']}/experts/expert-0/checkpoints"
        seen = subprocess.run(tb.exec_argv([sys.executable, "-c", WATCH, ckpts, str(step)]), capture_output=True,
                              text=True, env=env, timeout=1800, check=True).stdout.split()
        wan_before = tb.wan_bytes()
        killed_at = time.time()
        loss = {"site": site, "committed_step_seen": int(seen[1]), "seen_to_kill_s": killed_at - float(seen[2]),
                "kill": kill_mode, "kill_s": tb.kill_site(site, hard=kill_mode == "hard"),
                "wan_before_kill": wan_before}
    rc = driver.wait(timeout=3600)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{name}: archipelago train exited {rc}; see {log}:\n{log.read_text()[-3000:]}")
    res = subprocess.run(tb.exec_argv([sys.executable, "-c", READ, cfg["storage"]["root"]]), capture_output=True,
                         text=True, env=env, timeout=300, check=True)
    read = json.loads(res.stdout.strip().splitlines()[-1][len("RESULT "):])
    wan = tb.wan_bytes()
    row = {"wall_s": wall, "wan_bytes": wan, "wan_total_by_kind": _by_kind(wan, loss.get("wan_before_kill")),
           "island_wall_s": {i["name"]: i["wall_s"] for i in read["islands"]},
           "attempts": {i["name"]: i.get("attempts") for i in read["islands"]},
           "checkpoint_bytes_final": read["ckpt_bytes"], "stages": read["stages"],
           "start_steps": read["start_steps"], "steps_per_s_island1": read["steps_per_s_island1"]}
    if loss:
        resumed = read["start_steps"]["island-0"] or 0
        rate_sps = read["steps_per_s_island1"] or 0.0
        loss["resumed_from_step"] = resumed
        loss["steps_redone_est"] = steps_redone(loss["committed_step_seen"], loss["seen_to_kill_s"], rate_sps,
                                                resumed)
        row["site_loss"] = loss
    return row


def steps_redone(seen: int, seen_to_kill_s: float, steps_per_s: float, resumed: int) -> int:
    """Steps the lost attempt ran past the step the new one resumes from: it had reached about
    seen + steps_per_s * seen_to_kill_s when the site went. A graceful loss checkpoints on SIGTERM, so the new
    attempt can resume past `seen` and nothing is redone."""
    return max(0, round(seen + steps_per_s * max(0.0, seen_to_kill_s) - resumed))


def _by_kind(wan: dict[int, dict[str, dict[str, int]]], lost: dict | None = None) -> dict[str, int]:
    """Bytes per kind over every WAN link (both ways); a lost site's link counts up to its loss."""
    out: dict[str, int] = {}
    for per in list(wan.values()) + [v for k, v in (lost or {}).items() if k not in wan]:
        for kind, d in per.items():
            out[kind] = out.get(kind, 0) + d["to_site"] + d["from_site"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", nargs="+", default=["50mbit", "1gbit"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=100, help="expert.checkpoint_every")
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--kill-after-step", type=int, default=100)
    ap.add_argument("--skip-loss", action="store_true")
    ap.add_argument("--kill", choices=("hard", "graceful"), default="hard",
                    help="How the site is lost: hard = SIGKILL to all its processes at once (a power or network "
                         "cut); graceful = SIGTERM first (an orderly shutdown: the trainer checkpoints).")
    ap.add_argument("--loss-only", action="store_true",
                    help="Only the site-loss arm and its two-site baseline, side by side at the first rate "
                         "(-> multisite_site_loss.json unless --out).")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    loss_name = "multisite_site_loss.json" if args.kill == "hard" else "multisite_site_loss_graceful.json"
    args.out = args.out or str(RESULTS.with_name(loss_name) if args.loss_only else RESULTS)
    if args.loss_only:
        args.rates, args.skip_loss = args.rates[:1], False
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_common import machine, write_report

    from archipelago.cluster.multisite import MultiSiteConfig, MultiSiteTestbed

    info = machine()
    t_start = time.perf_counter()
    results: dict[str, Any] = {}

    def report(partial: bool) -> None:
        """Written after every arm too: a run cut short (a timeout, a crash) keeps what it measured."""
        write_report(args.out, {
            "benchmark": "multisite", "created_at": time.time(), "machine": info, "partial": partial,
            "loadavg_now": os.getloadavg(),
            "note": "shared 2-core machine under other jobs' load (see loadavg): walls are upper bounds; bytes "
                    "are not affected by load",
            "testbed": {"sites": 2, "nodes_per_site": 2, "cpus_per_node": 1, "up_s": testbed_up_s,
                        "up_timings_s": tb.timings},
            "wall_s": time.perf_counter() - t_start, "settings": vars(args), "rates": results,
            "table_md": table(results)})
    tb = MultiSiteTestbed(MultiSiteConfig(sites=2, nodes_per_site=2, num_cpus=1, wan_rate=args.rates[0]))
    t0 = time.perf_counter()
    tb.up()
    testbed_up_s = time.perf_counter() - t0
    print(f"testbed up in {testbed_up_s:.0f}s ({tb.timings})", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="arch-multisite-") as tmp:
            work = Path(tmp)
            sites = [tb.dashboard_url(i) for i in range(2)]
            for rate in args.rates:
                row: dict[str, Any] = {}
                arms = (("two_sites", sites),) if args.loss_only else (("two_sites", sites),
                                                                     ("one_site", [sites[0], sites[0]]))
                for arm, addresses in arms:
                    root = f"s3://archipelago/bench-{rate}-{arm}"
                    row[arm] = run_arm(tb, work, f"{rate}-{arm}", _config(args, root), addresses, rate)
                    print(f"   {rate:>7} {arm:<10} wall {row[arm]['wall_s']:6.1f}s  WAN MiB by kind "
                          f"{ {k: round(v / 2**20, 2) for k, v in row[arm]['wan_total_by_kind'].items()} }",
                          flush=True)
                    results[rate] = row
                    report(partial=True)
            if not args.skip_loss:
                rate = args.rates[0]
                root = f"s3://archipelago/bench-{rate}-site-loss"
                row = run_arm(tb, work, f"{rate}-site-loss", _config(args, root, on_site_loss="resubmit"), sites,
                              rate, kill=(0, args.kill_after_step), kill_mode=args.kill)
                row["site_loss"]["extra_wall_s"] = row["wall_s"] - results[rate]["two_sites"]["wall_s"]
                results[rate]["site_loss"] = row
                print(f"   {rate:>7} site loss  wall {row['wall_s']:6.1f}s  (+{row['site_loss']['extra_wall_s']:.1f}s), "
                      f"resumed from step {row['site_loss']['resumed_from_step']}, ~{row['site_loss']['steps_redone_est']}"
                      f" steps redone", flush=True)
    finally:
        tb.down()
    print("\n" + table(results))
    report(partial=False)
    return 0


def table(results: dict[str, Any]) -> str:
    lines = ["| WAN | run | pipeline wall s | island walls s | WAN MiB: S3 | MLflow | Ray jobs | other | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rate, row in results.items():
        for arm, r in row.items():
            mib = {k: v / 2**20 for k, v in r["wan_total_by_kind"].items()}
            note = ""
            if "site_loss" in r:
                s = r["site_loss"]
                note = (f"site 0 lost ({s.get('kill', 'graceful')} kill) after step {s['committed_step_seen']}: "
                        f"resumed from {s['resumed_from_step']}, "
                        f"~{s['steps_redone_est']} steps redone, +{s['extra_wall_s']:.1f} s")
            walls = ", ".join(f"{v:.1f}" for v in r["island_wall_s"].values())
            lines.append(f"| {rate} | {arm} | {r['wall_s']:.1f} | {walls} | {mib.get('s3', 0):.2f} | "
                         f"{mib.get('mlflow', 0):.3f} | {mib.get('ray_jobs', 0):.3f} | {mib.get('other', 0):.3f} | "
                         f"{note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
