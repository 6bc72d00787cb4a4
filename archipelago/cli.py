"""The `archipelago` command: parse -> config -> call. Every ArchipelagoError becomes one line on stderr
(exit 2); `--debug` (or ARCHIPELAGO_DEBUG=1) shows the traceback instead."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from archipelago.errors import ArchipelagoError, NotYetImplemented

console = Console(stderr=True)

app = typer.Typer(
    name="archipelago",
    help=(
        "Decentralized diffusion training: compute islands train expert diffusion models on data shards, "
        "a router ensembles them, distributed inference serves them.\n\n"
        "Example: archipelago data prepare --config configs/digits-quickstart.yaml --out runs/quickstart/data"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare data: embed, cluster into K balanced shards, write shards + manifest.",
                       no_args_is_help=True)
cluster_app = typer.Typer(help="Manage the Ray cluster the islands run on (local head on a laptop).",
                          no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(cluster_app, name="cluster")

ConfigOpt = typer.Option(Path("configs/digits-quickstart.yaml"), "--config", "-c",
                         help="YAML config (see configs/).")
SetOpt = typer.Option(None, "--set", help="Dotted override, repeatable: --set expert.depth=6")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    if debug:
        os.environ["ARCHIPELAGO_DEBUG"] = "1"


def _load(config: Path, overrides: Optional[list[str]]):
    from archipelago.config import load_config

    return load_config(config, overrides)


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------

@data_app.command("prepare")
def data_prepare(
    config: Path = ConfigOpt,
    out: Optional[str] = typer.Option(None, "--out", "-o", help="fsspec URL for shards + manifest "
                                      "(default: <storage.root>/data)."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Embed the source, partition it into K balanced clusters and write K shards + manifest.json.

    Example: archipelago data prepare --config configs/digits-quickstart.yaml --out s3://bucket/run1/data
    """
    from archipelago import storage
    from archipelago.data.prepare import prepare_data

    cfg = _load(config, overrides)
    out_url = out or storage.join(cfg.storage.root, "data")
    storage.ensure_reachable(out_url)
    t0 = time.perf_counter()
    manifest = prepare_data(cfg.data, out_url, progress=True)
    counts = ", ".join(str(c) for c in manifest.counts)
    purity = f", purity {manifest.purity:.3f}" if manifest.purity is not None else ""
    typer.echo(f"wrote {manifest.num_clusters} shards ({counts}{purity}) + manifest to {out_url} "
               f"in {time.perf_counter() - t0:.1f}s")


# ----------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------

@app.command("train-expert")
def train_expert_cmd(
    shard: int = typer.Option(..., "--shard", "-k", help="Shard id (= expert id) to train on."),
    config: Path = ConfigOpt,
    data: Optional[str] = typer.Option(None, "--data", help="Data URL (default: <storage.root>/data)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run URL (default: <storage.root>/experts/expert-K)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start from scratch even if checkpoints exist."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Train one expert on one shard (in-process, or under torchrun for ddp/fsdp2/deepspeed).

    Example: archipelago train-expert --shard 0 --config configs/digits-quickstart.yaml
    Multi-process: torchrun --nproc-per-node 2 -m archipelago.experts.train --shard 0
    --config configs/digits-quickstart.yaml --set expert.strategy=ddp
    """
    from archipelago import storage
    from archipelago.experts.train import train_expert

    cfg = _load(config, overrides)
    data_url = data or storage.join(cfg.storage.root, "data")
    out_url = out or storage.join(cfg.storage.root, "experts", f"expert-{shard}")
    from archipelago.experts.callbacks import RichProgressCallback

    result = train_expert(cfg, shard, data_url, out_url, callbacks=[RichProgressCallback()], resume=not no_resume)
    typer.echo(f"expert {shard}: {result['steps']} steps, final loss {result['final_loss']:.4f}, "
               f"checkpoint {result['final_checkpoint']}")


def _not_yet(what: str, issue: str) -> None:
    raise NotYetImplemented(f"`archipelago {what}` is not implemented in this version yet ({issue}); "
                            "see README for what works today")


@app.command("train")
def train_cmd(config: Path = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Full pipeline: data -> islands in parallel with the router -> ensemble.json -> samples -> eval.

    Example: ray job submit --address http://127.0.0.1:8265 --working-dir . -- archipelago train
    --config configs/digits-quickstart.yaml
    """
    _not_yet("train", "Ray orchestration of islands")


@app.command("train-router")
def train_router_cmd(config: Path = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Train the router r(x_t, t) over all shards.

    Example: archipelago train-router --config configs/digits-quickstart.yaml
    """
    _not_yet("train-router", "router and ensemble")


@app.command("generate")
def generate_cmd(config: Path = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Sample a PNG grid from an ensemble or a single expert.

    Example: archipelago generate --ensemble runs/quickstart/ensemble.json --mode top-1 --out grid.png
    """
    _not_yet("generate", "router and ensemble")


@app.command("eval")
def eval_cmd(config: Path = ConfigOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Score samples against reference data (offline feature distance; FID when weights are local).

    Example: archipelago eval --samples samples.safetensors --reference runs/quickstart/data
    """
    _not_yet("eval", "evaluation")


@cluster_app.command("up")
def cluster_up() -> None:
    """Start a local Ray head (laptop). Example: archipelago cluster up"""
    _not_yet("cluster up", "Ray orchestration of islands")


@cluster_app.command("status")
def cluster_status() -> None:
    """Show the Ray cluster. Example: archipelago cluster status"""
    _not_yet("cluster status", "Ray orchestration of islands")


@cluster_app.command("down")
def cluster_down() -> None:
    """Stop the local Ray head. Example: archipelago cluster down"""
    _not_yet("cluster down", "Ray orchestration of islands")


# ----------------------------------------------------------------------------------------------------
# quickstart
# ----------------------------------------------------------------------------------------------------

@app.command("quickstart")
def quickstart(
    config: Path = ConfigOpt,
    out: Optional[str] = typer.Option(None, "--out", help="Root URL for every output (default: storage.root)."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Run what exists end to end on the embedded default: prepare data, train expert 0, sample a grid.

    Example: archipelago quickstart --config configs/digits-quickstart.yaml --out runs/quickstart
    """
    from archipelago import storage
    from archipelago.data.prepare import prepare_data
    from archipelago.experts.callbacks import RichProgressCallback
    from archipelago.experts.train import train_expert

    cfg = _load(config, (overrides or []) + ([f"storage.root={out}"] if out else []))
    root = cfg.storage.root
    storage.ensure_reachable(root)
    data_url = storage.join(root, "data")
    manifest = prepare_data(cfg.data, data_url, progress=True)
    typer.echo(f"data: {manifest.num_clusters} shards {manifest.counts} -> {data_url}")
    expert_url = storage.join(root, "experts", "expert-0")
    result = train_expert(cfg, 0, data_url, expert_url, callbacks=[RichProgressCallback()])
    typer.echo(f"expert 0: {result['steps']} steps, final loss {result['final_loss']:.4f} -> "
               f"{result['final_checkpoint']}")
    from archipelago.generate import sample_grid

    grid_url = storage.join(root, "samples", "expert-0.png")
    sample_grid(result["final_checkpoint"], grid_url, cfg)
    typer.echo(f"samples: {grid_url}")


def main() -> None:
    debug = os.environ.get("ARCHIPELAGO_DEBUG") == "1" or "--debug" in sys.argv[1:]
    try:
        app()
    except ArchipelagoError as exc:
        if debug:
            raise
        line = " ".join(str(exc).split("\n"))
        console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
