"""Data at scale (issue 15; DESIGN.md §7 "data memory stays flat when the dataset grows 10x").

A synthetic 64x64 image folder (8 classes: 4 procedural shapes x 2 palettes, random size/place/background)
is generated at each size; for each size, in fresh processes (peak RSS = the process's own ru_maxrss):
  prepare   `data prepare` streamed: image folder -> tiny random AutoencoderKL (64x64x3 -> 4x8x8 latents)
            -> pixel_pca on latents -> MiniBatchKMeans K=4 -> chunked shards (chunk_mb 4); wall time, peak RSS
  island    one expert (DiT, hidden 64, depth 2) trained on shard 0: in-RAM loader vs streamed loader, from
            local disk and from a real S3 endpoint (moto_server); samples/s = batch / median step time over
            the loop's 10-step windows (data loading included, start-up and checkpoints excluded), peak RSS;
            arms alternated, median of --repeats
  loader    rows/s of the data path alone, no model: in-RAM indexing vs ChunkStream vs Ray Data
            (read_binary_files -> decode -> iter_torch_batches with a local shuffle buffer), largest size

    python benchmarks/data_scale.py            # 10k and 100k images -> benchmarks/results/data_scale.json
    python benchmarks/data_scale.py --quick    # tiny sizes, meaningless numbers (the smoke test)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "data_scale.json"

EXPERT = {"hidden_size": 64, "depth": 2, "num_heads": 4, "patch_size": 2, "batch_size": 64, "warmup_steps": 5,
          "checkpoint_every": 10_000, "log_every": 10, "keep_checkpoints": 1}


# ----------------------------------------------------------------------------------------------------
# Synthetic data and the tiny VAE
# ----------------------------------------------------------------------------------------------------

def make_images(root: Path, n: int, seed: int = 0) -> float:
    """n 64x64 PNGs under root/class{0..7}/ (reused when already complete); returns seconds spent."""
    import numpy as np
    from PIL import Image, ImageDraw

    done = root / f".complete-{n}"
    if done.exists():
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    palettes = [[(230, 60, 40), (240, 180, 30), (200, 40, 160)], [(40, 90, 230), (30, 190, 170), (90, 200, 60)]]
    for c in range(8):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % 8
        shape, pal = c % 4, palettes[c // 4]
        bg = int(rng.integers(0, 90))
        img = Image.new("RGB", (64, 64), (bg, bg, bg))
        d = ImageDraw.Draw(img)
        s = int(rng.integers(14, 30))
        x, y = (int(v) for v in rng.integers(2, 62 - s, size=2))
        col = pal[int(rng.integers(0, 3))]
        if shape == 0:
            d.ellipse((x, y, x + s, y + s), fill=col)
        elif shape == 1:
            d.rectangle((x, y, x + s, y + s), fill=col)
        elif shape == 2:
            d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=col)
        else:
            d.rectangle((x + s // 3, y, x + 2 * s // 3, y + s), fill=col)
            d.rectangle((x, y + s // 3, x + s, y + 2 * s // 3), fill=col)
        img.save(root / f"class{c}" / f"{i:07d}.png", compress_level=1)
    done.write_text("ok")
    return time.perf_counter() - t0


def make_vae(path: Path) -> Path:
    """A randomly initialised 4-level AutoencoderKL (64x64x3 -> 4x8x8), saved like a real local VAE."""
    if (path / "config.json").exists():
        return path
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=64).save_pretrained(str(path), safe_serialization=True)
    return path


def data_cfg(images: Path, vae: Path) -> dict[str, Any]:
    return {"source": "image_folder", "path": str(images), "image_size": 64, "num_clusters": 4,
            "shard_format": "chunked", "chunk_mb": 4.0, "prepare_batch": 512, "embed_dim": 32,
            "vae": {"path": str(vae), "batch_size": 128}}


# ----------------------------------------------------------------------------------------------------
# Children (one fresh process per measurement)
# ----------------------------------------------------------------------------------------------------

def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    from archipelago.config import DataConfig
    from archipelago.data.prepare import prepare_data

    rss0 = _rss_mib()
    t0 = time.perf_counter()
    m = prepare_data(DataConfig(**spec["data"]), spec["out"], progress=False)
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mib": _rss_mib(), "rss_after_imports_mib": rss0,
            "num_samples": m.num_samples, "held_out": m.holdout.count if m.holdout else 0, "counts": m.counts,
            "purity": m.purity,
            "chunks_per_shard": [len(s.chunks or []) for s in m.shards], "latent_shape": m.image_shape}


def child_train(spec: dict[str, Any]) -> dict[str, Any]:
    from archipelago.config import ArchipelagoConfig
    from archipelago.experts.train import train_expert

    cfg = ArchipelagoConfig.model_validate({"name": "data-scale", "tracking": {"enabled": False},
                                            "data": {**spec["data"], "loader": spec["loader"]},
                                            "expert": {**EXPERT, "steps": spec["steps"]}})
    shutil.rmtree(spec["out"], ignore_errors=True)
    res = train_expert(cfg, 0, spec["data_url"], spec["out"], resume=False)
    # Median over the loop's metric windows (first one, with start-up, excluded): robust to bursts of load
    # from other jobs on a shared machine, unlike the mean over the whole loop.
    rows = [json.loads(ln) for ln in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    windows = [r["step_time_s"] for r in rows if "step_time_s" in r]
    steps = windows[1:] or windows
    return {"samples_per_s": EXPERT["batch_size"] / statistics.median(steps), "samples_per_s_mean":
            res["samples_per_s"], "wall_s": res["wall_s"], "peak_rss_mib": _rss_mib(),
            "final_loss": res["final_loss"]}


def child_loader(spec: dict[str, Any]) -> dict[str, Any]:
    """Rows/s of the data path alone over `rows` rows of shard 0, batch 64."""
    import torch

    from archipelago.data.chunks import ChunkStream, chunk_refs
    from archipelago.data.shards import load_manifest, read_shard

    url, rows, b = spec["data_url"], spec["rows"], 64
    m = load_manifest(url)
    t0 = time.perf_counter()
    if spec["kind"] == "memory":
        data = read_shard(url, 0, manifest=m)
        g = torch.Generator().manual_seed(0)
        t1 = time.perf_counter()
        for _ in range(rows // b):
            idx = torch.randint(len(data), (b,), generator=g)
            x = data.images[idx]
    elif spec["kind"] == "chunkstream":
        s = ChunkStream(chunk_refs(url, m.shards[0]), seed=0, buffer=4096)
        x = s.batch(0, b)[0]
        t1 = time.perf_counter()
        for i in range(1, rows // b):
            x = s.batch(i, b)[0]
        s.close()
    else:  # Ray Data: the engine's own streaming reader, local shuffle buffer
        import numpy as np
        import ray
        from safetensors.numpy import load

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        paths = [f"{url}/{m.shards[0].file}/{c.file}" for c in m.shards[0].chunks or []]

        def decode(batch: dict[str, Any]) -> dict[str, Any]:
            xs, ys = [], []
            for blob in batch["bytes"]:
                t = load(bytes(blob))
                xs.append(t["images"])
                ys.append(t["labels"])
            return {"images": np.concatenate(xs), "labels": np.concatenate(ys)}

        ds = ray.data.read_binary_files(paths).map_batches(decode, batch_size=1)
        seen, t1 = 0, None
        while seen < rows:
            for batch in ds.iter_torch_batches(batch_size=b, local_shuffle_buffer_size=4096):
                if t1 is None:
                    t1 = time.perf_counter()
                seen += batch["images"].shape[0]
                x = batch["images"]
                if seen >= rows:
                    break
        ray.shutdown()
    t2 = time.perf_counter()
    del x
    return {"rows_per_s": (rows - b) / (t2 - t1), "first_batch_s": t1 - t0, "peak_rss_mib": _rss_mib()}


CHILDREN = {"prepare": child_prepare, "train": child_train, "loader": child_loader}


def run_child(kind: str, spec: dict[str, Any], env: dict[str, str] | None = None, lock: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--spec", json.dumps(spec)]
    if lock:   # anything starting Ray shares the machine-wide heavy lock
        cmd = ["flock", "/tmp/archipelago-heavy.lock", *cmd]
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    p = subprocess.run(cmd, capture_output=True, text=True, env=full, cwd=REPO, timeout=3600, check=False)
    if p.returncode != 0:
        raise SystemExit(f"child {kind} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# S3: a real moto_server, the prepared data uploaded to it
# ----------------------------------------------------------------------------------------------------

class Moto:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                    "AWS_DEFAULT_REGION": "us-east-1"}
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        import boto3

        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                               aws_access_key_id="bench", aws_secret_access_key="bench")
        self.s3.create_bucket(Bucket="bench")

    def upload(self, local: Path, prefix: str) -> str:
        for f in sorted(local.rglob("*")):
            if f.is_file():
                self.s3.upload_file(str(f), "bench", f"{prefix}/{f.relative_to(local).as_posix()}")
        return f"s3://bench/{prefix}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="images per run (default 10000 100000)")
    p.add_argument("--steps", type=int, default=None, help="training steps per island run (default 150)")
    p.add_argument("--repeats", type=int, default=None, help="alternated repeats of each island run (default 3)")
    p.add_argument("--no-ray-data", action="store_true", help="skip the Ray Data loader arm")
    p.add_argument("--work", default="/tmp/archipelago-data-scale", help="where images and data go")
    p.add_argument("--out", default=None, help="report path")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(CHILDREN[a.child](json.loads(a.spec))))
        return

    from bench_common import machine, write_report

    sizes = a.sizes or ([200, 2000] if a.quick else [10_000, 100_000])
    steps = a.steps or (10 if a.quick else 150)
    repeats = a.repeats or (1 if a.quick else 3)
    work = Path(a.work + ("-quick" if a.quick else ""))
    out = a.out or (str(work / "data_scale-quick.json") if a.quick else str(RESULTS))
    work.mkdir(parents=True, exist_ok=True)
    vae = make_vae(work / "tiny-vae")
    report: dict[str, Any] = {"machine": machine(), "sizes": sizes, "steps": steps, "repeats": repeats,
                              "expert": EXPERT, "runs": {}, "loader": {}}
    moto = Moto()
    try:
        for n in sizes:
            images = work / f"images-{n}"
            gen_s = make_images(images, n)
            data = work / f"data-{n}"
            shutil.rmtree(data, ignore_errors=True)
            prep = run_child("prepare", {"data": data_cfg(images, vae), "out": str(data)})
            print(f"[{n}] prepare {prep['wall_s']:.1f}s, peak RSS {prep['peak_rss_mib']:.0f} MiB, "
                  f"chunks/shard {prep['chunks_per_shard']}", flush=True)
            s3_url = moto.upload(data, f"data-{n}")
            arms = {"memory/local": ("memory", str(data), None), "stream/local": ("stream", str(data), None),
                    "memory/s3": ("memory", s3_url, moto.env), "stream/s3": ("stream", s3_url, moto.env)}
            runs: dict[str, list[dict]] = {k: [] for k in arms}
            for _ in range(repeats):   # alternated, so load from other jobs hits every arm alike
                for name, (loader, url, env) in arms.items():
                    runs[name].append(run_child("train", {
                        "data": data_cfg(images, vae), "loader": loader, "data_url": url, "steps": steps,
                        "out": str(work / f"expert-{n}-{name.replace('/', '-')}")}, env=env))
            island = {name: {"samples_per_s": statistics.median(r["samples_per_s"] for r in rs),
                             "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
                             "samples_per_s_all": [r["samples_per_s"] for r in rs]} for name, rs in runs.items()}
            for name, v in island.items():
                print(f"[{n}] island {name:13s} {v['samples_per_s']:8.0f} samples/s, peak RSS "
                      f"{v['peak_rss_mib']:.0f} MiB", flush=True)
            report["runs"][str(n)] = {"generate_images_s": gen_s, "prepare": prep, "island": island,
                                      "shard0_count": prep["counts"][0]}
        big = sizes[-1]
        data = str(work / f"data-{big}")
        rows = 20_000 if not a.quick else 1_000
        kinds = ["memory", "chunkstream"] + ([] if a.no_ray_data or a.quick else ["ray_data"])
        for kind in kinds:
            report["loader"][kind] = run_child("loader", {"data_url": data, "rows": rows, "kind": kind},
                                               lock=kind == "ray_data")
            print(f"[{big}] loader {kind:12s} {report['loader'][kind]['rows_per_s']:10.0f} rows/s, first batch "
                  f"{report['loader'][kind]['first_batch_s']:.2f}s, peak RSS "
                  f"{report['loader'][kind]['peak_rss_mib']:.0f} MiB", flush=True)
    finally:
        moto.close()

    # ---- summary: the goals ----------------------------------------------------------------
    lo, hi = (report["runs"][str(s)] for s in (sizes[0], sizes[-1]))
    summary = {
        "data_growth": sizes[-1] / sizes[0],
        "prepare_rss_ratio": hi["prepare"]["peak_rss_mib"] / lo["prepare"]["peak_rss_mib"],
        "island_stream_rss_ratio": hi["island"]["stream/local"]["peak_rss_mib"]
        / lo["island"]["stream/local"]["peak_rss_mib"],
        "island_memory_rss_ratio": hi["island"]["memory/local"]["peak_rss_mib"]
        / lo["island"]["memory/local"]["peak_rss_mib"],
        "prepare_wall_s": {str(s): report["runs"][str(s)]["prepare"]["wall_s"] for s in sizes},
        "stream_vs_memory_throughput": {
            f"{s}/{where}": report["runs"][str(s)]["island"][f"stream/{where}"]["samples_per_s"]
            / report["runs"][str(s)]["island"][f"memory/{where}"]["samples_per_s"]
            for s in sizes for where in ("local", "s3")},
        "goals": {"rss_ratio_max": 1.2, "stream_vs_memory_min": 0.9},
    }
    report["summary"] = summary
    print("\n| size | prepare wall | prepare peak RSS | island mem/local | stream/local | mem/s3 | stream/s3 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for s in sizes:
        r = report["runs"][str(s)]
        isl = r["island"]
        print(f"| {s} | {r['prepare']['wall_s']:.1f} s | {r['prepare']['peak_rss_mib']:.0f} MiB | "
              + " | ".join(f"{isl[k]['samples_per_s']:.0f}/s ({isl[k]['peak_rss_mib']:.0f} MiB)"
                           for k in ("memory/local", "stream/local", "memory/s3", "stream/s3")) + " |")
    print(f"\nprepare RSS ratio {summary['prepare_rss_ratio']:.3f}, island (stream) RSS ratio "
          f"{summary['island_stream_rss_ratio']:.3f} for {summary['data_growth']:.0f}x data; stream/memory "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary["stream_vs_memory_throughput"].items()))
    write_report(out, report)


if __name__ == "__main__":
    main()
