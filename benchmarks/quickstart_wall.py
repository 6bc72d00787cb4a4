"""Wall time of the quickstart (the full pipeline on the embedded default, K=4 experts + router on local
Ray), as `make quickstart` runs it, with the pipeline's own per-stage times. Issue goal: <= 6 min on 2 CPUs.

Usage: python benchmarks/quickstart_wall.py [--out benchmarks/results/quickstart.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quickstart.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="archipelago-quickstart-") as tmp:
        load_start = os.getloadavg()
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "archipelago.cli", "quickstart", "--config",
                              str(REPO / "configs" / "digits-quickstart.yaml"), "--out", tmp],
                             check=False, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"quickstart failed (exit {res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
        summary = json.loads((Path(tmp) / "pipeline.json").read_text())
    out = {
        "benchmark": "quickstart_wall",
        "goal_s": 360,
        "wall_s": round(wall, 1),
        "meets_goal": wall <= 360,
        "stages_s": summary.get("stages"),
        "feature_distance": (summary.get("eval") or {}).get("feature_distance"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'quickstart wall':<20} {wall:8.1f} s   (goal <= 360 s)")
    for name, secs in (out["stages_s"] or {}).items():
        print(f"  {name:<18} {secs:8.1f} s")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
