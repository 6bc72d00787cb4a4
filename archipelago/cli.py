"""The `archipelago` command: parse -> config -> call. Every ArchipelagoError becomes one line on stderr
(exit 2); `--debug` (or ARCHIPELAGO_DEBUG=1) shows the traceback instead."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

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


def _load(config: Path, overrides: list[str] | None):
    from archipelago.config import load_config

    return load_config(config, overrides)


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------

@data_app.command("prepare")
def data_prepare(
    config: Path = ConfigOpt,
    out: str | None = typer.Option(None, "--out", "-o", help="fsspec URL for shards + manifest "
                                      "(default: <storage.root>/data)."),
    overrides: list[str] | None = SetOpt,
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
    data: str | None = typer.Option(None, "--data", help="Data URL (default: <storage.root>/data)."),
    out: str | None = typer.Option(None, "--out", help="Run URL (default: <storage.root>/experts/expert-K)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start from scratch even if checkpoints exist."),
    lease_wait_s: float = typer.Option(0.0, "--lease-wait-s", min=0, help="Wait this long for another "
                                       "trainer's lease on --out to end (an attempt lost with its site)."),
    overrides: list[str] | None = SetOpt,
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

    result = train_expert(cfg, shard, data_url, out_url, callbacks=[RichProgressCallback()], resume=not no_resume,
                          lease_wait_s=lease_wait_s)
    typer.echo(f"expert {shard}: {result['steps']} steps, final loss {result['final_loss']:.4f}, "
               f"checkpoint {result['final_checkpoint']}")


def _not_yet(what: str, issue: str) -> None:
    raise NotYetImplemented(f"`archipelago {what}` is not implemented in this version yet ({issue}); "
                            "see README for what works today")


VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show Ray's and the workers' logs here (by default "
                          "they go to a log file whose path is printed, and a live table shows the progress).")


@app.command("train")
def train_cmd(config: Path = ConfigOpt, overrides: list[str] | None = SetOpt, verbose: bool = VerboseOpt) -> None:
    """Full pipeline: data -> islands in parallel with the router -> ensemble.json -> samples -> eval.

    Each shard's expert trains on its own island (a Ray Train job); an island that fails for good does not
    stop the others, and running the same command again trains only the missing experts. A live table shows
    each island's step, loss, samples/s and ETA; Ray's logs go to a file (--verbose: here instead).

    Example: archipelago train --config configs/digits-quickstart.yaml --set expert.steps=50
    On a Ray cluster: run the `submit:` line that `archipelago cluster up` prints.
    """
    from archipelago.orchestration.pipeline import resolve_root, run_pipeline, run_pipeline_live
    from archipelago.quiet import log_path

    cfg = _load(config, overrides)
    t0 = time.perf_counter()
    if verbose:
        result = run_pipeline(cfg, progress=True, echo=typer.echo)
        typer.echo(result.table())
    else:
        logs = log_path(resolve_root(cfg).storage.root, "train")
        typer.echo(f"logs: {logs} (--verbose shows them here)")
        result = run_pipeline_live(cfg, logs)
        for line in result.failure_lines():
            typer.echo(line)
    result.raise_if_failed()
    typer.echo(result.done_line(time.perf_counter() - t0))


@app.command("train-router")
def train_router_cmd(
    config: Path = ConfigOpt,
    data: str | None = typer.Option(None, "--data", help="Data URL (default: <storage.root>/data)."),
    out: str | None = typer.Option(None, "--out", help="Router URL (default: <storage.root>/router)."),
    unconditional: bool = typer.Option(False, "--unconditional",
                                       help="Route on (x_t, t) only (same as --set router.class_conditional="
                                            "false); by default the config decides (true: the class too)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Train again even if an identical router exists."),
    overrides: list[str] | None = SetOpt,
) -> None:
    """Train the router r(x_t, t) over all shards (needs no expert; runs beside the islands).

    Example: archipelago train-router --config configs/digits-quickstart.yaml --data runs/quickstart/data
    --out runs/quickstart/router
    """
    from archipelago import storage
    from archipelago.experts.callbacks import RichProgressCallback
    from archipelago.router.train import train_router

    cfg = _load(config, overrides)
    data_url = data or storage.join(cfg.storage.root, "data")
    out_url = out or storage.join(cfg.storage.root, "router")
    result = train_router(cfg, data_url, out_url, callbacks=[RichProgressCallback("router")],
                          class_conditional=False if unconditional else None, resume=not no_resume)
    m = result["metrics"]
    bins = "  ".join(f"t{b['t_lo']:.1f}-{b['t_hi']:.1f}: {b['accuracy']:.2f}" for b in m["t_bins"])
    typer.echo(f"router (K={result['num_experts']}): accuracy {m['accuracy']:.3f} (chance {m['chance']:.3f}), "
               f"ECE {m['ece']:.3f}, alignment {m['alignment']:.3f} -> {out_url}")
    typer.echo(f"accuracy per t-bin: {bins}")


@app.command("generate")
def generate_cmd(
    ensemble: str | None = typer.Option(None, "--ensemble", help="ensemble.json URL (or its directory)."),
    expert: str | None = typer.Option(None, "--expert", help="One expert checkpoint directory instead."),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML whose `inference:` section (and "
                                          "expert.cfg_scale / sample_steps / sampler) sets the defaults below "
                                          "(default: the built-in defaults)."),
    overrides: list[str] | None = SetOpt,
    mode: str | None = typer.Option(None, "--mode", help="Ensemble routing: full | top-1 | top-2 | ... | top-K | "
                                    "sample-once (one expert per sample drawn from p(k | class), run to the end). "
                                    "[inference.routing, default top-1]"),
    n: int | None = typer.Option(None, "--n", min=1, help="Number of samples. [inference.num_samples, 64]"),
    cfg_scale: float | None = typer.Option(None, "--cfg", min=0.0, help="Classifier-free guidance scale (1 = "
                                           "off). [expert.cfg_scale, 2.0]"),
    seed: int | None = typer.Option(None, "--seed", help="Noise seed. [inference.seed, 0]"),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Sampler steps. [expert.sample_steps, 32]"),
    sampler: str | None = typer.Option(None, "--sampler", help="euler | heun. [expert.sampler, euler]"),
    out: str = typer.Option("grid.png", "--out", "-o", help="PNG grid URL (GIF for video experts)."),
    save_tensor: str | None = typer.Option(None, "--save-tensor",
                                              help="Also write samples + labels as safetensors (for eval)."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N."),
    parallel: str | None = typer.Option(None, "--parallel", help="Split the job over ranks: naive_patch | "
                                        "sync_patch | distrifusion | cfg_parallel | expert_parallel | ulysses | "
                                        "ring | usp | pipefusion (video experts: ulysses | ring | usp | "
                                        "cfg_parallel). Fast links: usp / ulysses (exact); slow links (1 Gbit/s "
                                        "and below): pipefusion (docs/architecture.md). [inference.mode, single]"),
    world_size: int | None = typer.Option(None, "--world-size", min=1, help="Ranks of --parallel. "
                                          "[inference.world_size, 2]"),
    launcher: str | None = typer.Option(None, "--launcher", help="torchrun | ray | local (with --parallel). "
                                        "[inference.launcher, torchrun]"),
    patch_mode: str | None = typer.Option(None, "--patch-mode", help="Patch mode inside cfg_parallel. "
                                          "[inference.patch_mode, sync_patch]"),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", min=0, help="DistriFusion synchronous steps. "
                                            "[inference.warmup_steps, 1]"),
    comm_group_layers: int | None = typer.Option(None, "--comm-group-layers", min=1, help="DistriFusion: layers "
                                                 "per async K/V exchange. [inference.comm_group_layers, 1]"),
    cfg_degree: int | None = typer.Option(None, "--cfg-degree", min=1, max=2, help="ulysses | ring | usp | "
                                          "pipefusion: 2 runs the CFG branches on separate rank groups (the "
                                          "degrees multiply to --world-size). [inference.cfg_degree, 1]"),
    ulysses_degree: int | None = typer.Option(None, "--ulysses-degree", min=1, help="ulysses | usp: ranks "
                                              "splitting the heads. [inference.ulysses_degree, inferred]"),
    ring_degree: int | None = typer.Option(None, "--ring-degree", min=1, help="ring | usp: ranks passing K/V "
                                           "round a ring. [inference.ring_degree, inferred]"),
    pipe_patches: int | None = typer.Option(None, "--pipe-patches", min=1, help="pipefusion: patches per image "
                                            "(stages = world size / cfg degree). [inference.pipe_patches, stages]"),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster for --launcher ray "
                                           "(default: $RAY_ADDRESS, else a local Ray)."),
    stats: str | None = typer.Option(None, "--stats", help="JSON URL with every rank's latency, peak memory "
                                     "and bytes sent (with --parallel)."),
    pin: str | None = typer.Option(None, "--pin", help="--launcher ray: a Ray resource per rank, comma-separated "
                                   "(e.g. node_1,node_2: each rank on the node advertising it)."),
    vae: str | None = typer.Option(None, "--vae", help="Latent models: decode with the VAE directory here "
                                   "instead of the one recorded at training (must be the same VAE)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="--parallel: show the ranks' and launchers' "
                                 "output here (by default: one progress bar, the rest in a log file)."),
) -> None:
    """Sample a PNG grid from an ensemble or a single expert (classes 0..9 repeated, seeded noise).

    Settings come from the config tree (`inference:`, and the sampler fields of `expert:`); each flag
    overrides its field (shown in brackets) exactly like `--set field=value`.
    `--set expert.compile=true` torch.compiles the experts (and router) first: slower start, faster steps.

    Example: archipelago generate --ensemble runs/quickstart/ensemble.json --mode top-1 --n 64 --cfg 2.0
    --seed 0 --steps 32 --out grid.png --save-tensor samples.safetensors

    Across ranks (same noise, same samples as one device for sync_patch/cfg_parallel/expert_parallel):
    archipelago generate --expert runs/quickstart/experts/expert-0/final --parallel distrifusion
    --world-size 2 --launcher ray --out grid.png
    archipelago generate --expert CKPT --parallel usp --world-size 4 --ulysses-degree 2 --launcher torchrun
    archipelago generate --expert CKPT --parallel ulysses --cfg-degree 2 --world-size 4 --cfg 2.0
    archipelago generate --expert CKPT --parallel pipefusion --world-size 2 --pipe-patches 4 --warmup-steps 2
    """
    from archipelago.errors import ConfigError
    from archipelago.sampling_job import GenerateRequest, flag_overrides, run_generate

    if (ensemble is None) == (expert is None):
        raise ConfigError("generate: give exactly one of --ensemble URL or --expert URL")
    if sampler is not None and sampler not in ("euler", "heun"):
        raise ConfigError(f"generate: --sampler {sampler!r}; allowed: euler | heun")
    if parallel is not None and parallel == "single":
        raise ConfigError("generate: --parallel single; leave --parallel out for one process")
    if ensemble is not None and mode is not None:   # the flag's own line, before the config is read
        from archipelago.ensemble import parse_mode
        from archipelago.errors import EnsembleError

        try:
            parse_mode(mode)
        except EnsembleError as exc:
            raise ConfigError(f"generate: --mode: {exc}") from None
    cfg = _load(config, (overrides or []) + flag_overrides(
        mode=mode, n=n, seed=seed, cfg_scale=cfg_scale, steps=steps, sampler=sampler, parallel=parallel,
        world_size=world_size, launcher=launcher, patch_mode=patch_mode, warmup_steps=warmup_steps,
        comm_group_layers=comm_group_layers, cfg_degree=cfg_degree, ulysses_degree=ulysses_degree,
        ring_degree=ring_degree, pipe_patches=pipe_patches))
    request = GenerateRequest(source=ensemble or expert, is_ensemble=ensemble is not None, out=out,
                              save_tensor=save_tensor, device=device, ray_address=ray_address, stats=stats,
                              pin=[r.strip() for r in pin.split(",")] if pin else None, vae=vae, verbose=verbose)
    run_generate(cfg, request, typer.echo)


ServeConfigOpt = typer.Option(None, "--config", "-c", help="YAML whose `serve:` section sets the defaults below "
                              "(default: the built-in defaults).")


@app.command("serve")
def serve_cmd(
    ensemble: str = typer.Option(..., "--ensemble", help="ensemble.json URL (or its directory)."),
    config: Path | None = ServeConfigOpt,
    overrides: list[str] | None = SetOpt,
    host: str | None = typer.Option(None, "--host", help="Address to bind. [serve.host, 127.0.0.1]"),
    port: int | None = typer.Option(None, "--port", min=1, max=65535, help="HTTP port. [serve.port, 8000]"),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Deploy on this Ray cluster (default: "
                                           "$RAY_ADDRESS, else a private local Ray)."),
) -> None:
    """Serve an ensemble over HTTP on Ray Serve: the router and each expert are deployments of their own,
    concurrent requests are batched, and a request gives the samples `archipelago generate` gives for the
    same arguments. A bearer token is required when the variable named by serve.token_env
    (ARCHIPELAGO_SERVE_TOKEN) is set.

    Example: archipelago serve --ensemble runs/quickstart/ensemble.json --port 8000

    then: curl -s -X POST http://127.0.0.1:8000/v1/generate -H 'Content-Type: application/json'
    -d '{"n": 8, "classes": [0,1,2,3,4,5,6,7], "steps": 32, "cfg": 2.0, "seed": 0}' -o grid.png
    """
    from archipelago.serve.run import serve_ensemble

    flags = {"host": host, "port": port}
    cfg = _load(config, (overrides or []) + [f"serve.{k}={v}" for k, v in flags.items() if v is not None])
    serve_ensemble(ensemble, cfg.serve, typer.echo, ray_address=ray_address)


@app.command("eval")
def eval_cmd(
    samples: str = typer.Option(..., "--samples", help="safetensors with 'samples' (+ 'labels'), from generate."),
    reference: str = typer.Option(..., "--reference", help="Prepared data URL (manifest.json + shards)."),
    shard: int | None = typer.Option(None, "--shard", help="Compare with this shard only."),
    out: str | None = typer.Option(None, "--out", help="JSON result URL (default: <samples>.eval.json)."),
    classifier_cache: str | None = typer.Option(None, "--classifier-cache",
                                                   help="safetensors URL caching the feature classifier "
                                                        "(default: under <reference>/eval/)."),
) -> None:
    """Score samples against reference data (offline feature distance; FID when weights are local).

    Example: archipelago eval --samples samples.safetensors --reference runs/quickstart/data
    """
    from rich.table import Table

    from archipelago import storage
    from archipelago.eval.metrics import evaluate_samples
    from archipelago.generate import load_samples

    x, labels = load_samples(samples)
    result = evaluate_samples(x, labels, reference, shard=shard, cache_url=classifier_cache)
    out_url = out or samples.removesuffix(".safetensors") + ".eval.json"
    storage.write_json(out_url, {"samples": samples, **result})
    table = Table(title=f"eval: {samples} vs {reference}" + (f" shard {shard}" if shard is not None else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")

    def fmt(v: object) -> str:
        return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    for key in ("n_samples", "n_reference", "feature_distance", "reference_floor", "class_consistency",
                "classifier_test_accuracy", "fid", "kid"):
        table.add_row(key, fmt(result[key]))
    Console().print(table)
    if result.get("fid_note"):
        typer.echo(result["fid_note"])
    typer.echo(f"wrote {out_url}")


AddressOpt = typer.Option(None, "--address", help="An existing cluster: its dashboard URL (http://host:8265) or "
                          "GCS address (host:6379). Omit for the local head.")
RayArgOpt = typer.Option(None, "--ray-arg", help="Extra `ray start` flag, repeatable: "
                         "--ray-arg=--ray-client-server-port=10002")
StateOpt = typer.Option(None, "--state-file", help="Where `cluster up` records the local head "
                        "(default: ~/.archipelago/local-cluster.json or $ARCHIPELAGO_CLUSTER_STATE).")


@cluster_app.command("up")
def cluster_up(
    num_cpus: int | None = typer.Option(None, "--num-cpus", min=1, help="CPUs the head offers (default: all)."),
    port: int = typer.Option(6379, "--port", help="GCS port of the head."),
    dashboard_port: int = typer.Option(8265, "--dashboard-port", help="Dashboard / job-submission port."),
    temp_dir: str | None = typer.Option(None, "--temp-dir", help="Ray's session root (default /tmp/ray)."),
    ray_args: list[str] | None = RayArgOpt,
    address: str | None = AddressOpt,
    state_file: Path | None = StateOpt,
) -> None:
    """Start a local Ray head for the islands (laptop), or check that a remote cluster answers.

    Runs `ray start --head --num-cpus=N --dashboard-host 127.0.0.1` in the background and prints the exact
    `ray job submit` line for it (prefixed with RAY_AUTH_MODE=token when the head requires Ray's token).

    Example: archipelago cluster up --num-cpus 4
    """
    from archipelago.cluster import local

    if address:
        typer.echo(local.cluster_status(address))
        return
    head, started = local.cluster_up(num_cpus=num_cpus, port=port, dashboard_port=dashboard_port,
                                     temp_dir=temp_dir, state_file=state_file, extra_args=ray_args)
    typer.echo(f"{'started' if started else 'already running:'} local Ray head (pid {head.pid}, "
               f"{head.num_cpus} CPUs): address {head.gcs_address}, dashboard {head.dashboard_url}")
    typer.echo("submit: " + local.submit_line(head.dashboard_url, "archipelago train --config "
                                              "configs/digits-quickstart.yaml --set storage.root=$PWD/runs/quickstart"))


@cluster_app.command("status")
def cluster_status(address: str | None = AddressOpt, state_file: Path | None = StateOpt) -> None:
    """Show the Ray cluster (`ray status`): the local head, or the cluster at --address.

    Example: archipelago cluster status --address http://127.0.0.1:8265
    """
    from archipelago.cluster import local, netns_state

    if address is None and (sites := netns_state.sites_status()) is not None:
        typer.echo(sites)      # the multi-site testbed of `cluster local --sites`: one line per site
        return
    typer.echo(local.cluster_status(address, state_file=state_file))


@cluster_app.command("down")
def cluster_down(
    address: str | None = AddressOpt,
    state_file: Path | None = StateOpt,
    force: bool = typer.Option(False, "--force", help="No head of ours recorded: run `ray stop` (stops every "
                               "Ray process of this user on this machine)."),
) -> None:
    """Stop the local Ray head that `cluster up` started (only that one); a remote cluster is left alone.

    Example: archipelago cluster down
    """
    from archipelago.cluster import local

    if address:
        typer.echo(f"{local.redact_address(address)} is not managed from this machine; nothing stopped "
                   f"(shut it down where it was created, e.g. helm uninstall)")
        return
    head = local.cluster_down(state_file=state_file)
    if head is not None:
        typer.echo(f"stopped local Ray head (pid {head.pid}, {head.gcs_address})")
    elif force:
        typer.echo(local.ray_stop_all() or "ray stop: done")
    else:
        typer.echo(f"no local head started by `archipelago cluster up` ({local.state_path(state_file)}); "
                   f"nothing stopped (use --force to run `ray stop`)")


NetnsStateOpt = typer.Option(None, "--state-file", help="Where `cluster local` records its namespaces "
                             "(default: ~/.archipelago/netns-cluster.json or $ARCHIPELAGO_NETNS_STATE).")


@cluster_app.command("local")
def cluster_local(
    nodes: int = typer.Option(3, "--nodes", min=1, help="Nodes (network namespaces); node 0 runs the Ray head."),
    link_rate: str = typer.Option("1gbit", "--link-rate", help="Rate of each node's link, both directions "
                                  "(tc tbf: 50mbit, 1gbit); 'none' for unshaped."),
    num_cpus: int = typer.Option(1, "--num-cpus", min=1, help="Logical CPUs each Ray node offers."),
    object_store_mb: int = typer.Option(200, "--object-store-mb", min=80, help="Plasma store per node (MiB)."),
    subnet: str = typer.Option("10.213.0.0/24", "--subnet", help="Private subnet; exists only inside the "
                               "namespaces."),
    dashboard: bool = typer.Option(True, "--dashboard/--no-dashboard", help="Run the head's dashboard (for "
                                   "`ray job submit` from inside a node)."),
    down: bool = typer.Option(False, "--down", help="Tear down the cluster this command started."),
    sites: int = typer.Option(0, "--sites", min=0, help="Multi-site testbed: this many sites, each its own Ray "
                              "cluster, behind a WAN link to a services namespace (S3 + MLflow server)."),
    nodes_per_site: int = typer.Option(2, "--nodes-per-site", min=1, help="Ray nodes per site (--sites)."),
    wan_rate: str = typer.Option("50mbit", "--wan-rate", help="Each site's WAN link, both directions (--sites)."),
    state_file: Path | None = NetnsStateOpt,
) -> None:
    """Real multi-node Ray on one machine (root): N network namespaces on a bridge, each link rate-limited
    with tc tbf, a Ray node in each with custom resource node_<i> for pinning islands.

    Commands run on a node with `ip netns exec <namespace> ...`; the head address is reachable only from
    inside the namespaces. Pin an island with --set islands.per_island.0.resources.node_1=1.
    With --sites N: N independent Ray clusters ("datacenters") whose only shared things are a real S3
    endpoint (moto_server) and a real MLflow server behind their WAN links; it prints the driver's command.

    Example: archipelago cluster local --nodes 3 --link-rate 100mbit
    Multi-site: archipelago cluster local --sites 2 --nodes-per-site 2 --wan-rate 50mbit
    """
    from archipelago.cluster import netns_state
    from archipelago.cluster.netns import NetnsConfig

    if down:
        typer.echo(netns_state.local_down(state_file))
        return
    if sites:
        from archipelago.cluster.multisite import MultiSiteConfig

        typer.echo(netns_state.sites_up(MultiSiteConfig(sites=sites, nodes_per_site=nodes_per_site,
                                                        wan_rate=wan_rate, lan_rate=link_rate, num_cpus=num_cpus,
                                                        object_store_mb=object_store_mb), state_file))
        return
    typer.echo(netns_state.local_up(NetnsConfig(nodes=nodes, link_rate=link_rate, num_cpus=num_cpus,
                                                object_store_mb=object_store_mb, subnet=subnet,
                                                include_dashboard=dashboard), state_file))


@cluster_app.command("cleanup")
def cluster_cleanup(
    prefix: str = typer.Option("arch-", "--prefix", help="Remove namespaces whose name starts with this "
                               "(default: every namespace cluster of Archipelago on this machine)."),
    state_file: Path | None = NetnsStateOpt,
) -> None:
    """Remove leftover namespace clusters (after a crash): kill their processes, delete their namespaces,
    bridges and Ray temp dirs. Never runs `ray stop`: other Ray instances on the machine are left alone.

    Example: archipelago cluster cleanup --prefix arch-
    """
    from archipelago.cluster import netns_state

    typer.echo(netns_state.cleanup(prefix, state_file))


# ----------------------------------------------------------------------------------------------------
# quickstart
# ----------------------------------------------------------------------------------------------------

@app.command("quickstart")
def quickstart(
    config: Path = ConfigOpt,
    out: str | None = typer.Option(None, "--out", help="Root URL for every output (default: storage.root)."),
    overrides: list[str] | None = SetOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """The main job on the embedded default, then a map of where everything landed.

    Runs the full pipeline (`archipelago train`): data -> one island per shard in parallel with the router
    -> ensemble.json -> sample grid -> eval, tracked in MLflow.

    Example: archipelago quickstart --config configs/digits-quickstart.yaml --out runs/quickstart
    """
    from archipelago import storage
    from archipelago.orchestration.pipeline import output_map

    cfg_overrides = (overrides or []) + ([f"storage.root={out}"] if out else [])
    train_cmd(config=config, overrides=cfg_overrides, verbose=verbose)
    cfg = _load(config, cfg_overrides)
    typer.echo("\noutputs:")
    for name, url in output_map(cfg):
        typer.echo(f"  {name:<24} {url}")
    typer.echo(f"next: archipelago generate --ensemble {storage.join(cfg.storage.root, 'ensemble.json')} "
               f"--mode top-2 --out grid.png")


@app.command("generate-video")
def generate_video_cmd(
    expert: str = typer.Option(..., "--expert", help="Video expert checkpoint (a VideoDiT, e.g. trained with "
                               "configs/moving-digits-video.yaml)."),
    frames: int = typer.Option(256, "--frames", min=1, help="Frames of the output video."),
    block: int = typer.Option(8, "--block", min=1, help="Frames per block (<= the training clip length)."),
    num_cat: int = typer.Option(2, "--num-cat", min=0, help="Context / neighbour-K/V frames between blocks."),
    steps: int = typer.Option(16, "--steps", min=1, help="Euler steps per block."),
    world_size: int = typer.Option(1, "--world-size", min=1, help="Pipeline ranks (model blocks split)."),
    launcher: str = typer.Option("torchrun", "--launcher", help="torchrun | ray | local (world size > 1)."),
    out: str = typer.Option("video.gif", "--out", "-o", help="GIF URL; the raw video goes next to it as "
                            ".safetensors unless --tensor-out is given."),
    tensor_out: str | None = typer.Option(None, "--tensor-out", help="safetensors URL of [N,C,F,H,W]."),
    labels: str = typer.Option("0", "--labels", help="Comma-separated class per video, e.g. 3 or 1,7."),
    cfg_scale: float = typer.Option(1.0, "--cfg", min=0.0, help="Classifier-free guidance scale (1 = off)."),
    seed: int = typer.Option(0, "--seed", help="Noise seed."),
    noise: str = typer.Option("coordinated", "--noise", help="coordinated | independent block noise."),
    positions: str = typer.Option("absolute", "--positions", help="absolute | local temporal positions."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (one GPU per rank)."),
    stats: str | None = typer.Option(None, "--stats", help="JSON URL with every rank's measurements."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the ranks' and launchers' output here "
                                 "(by default: one progress bar, the rest in a log file whose path is printed)."),
) -> None:
    """Generate a video far longer than the training clips with DualParal (block-wise denoising over a ring
    pipeline of model stages; world size 1 is the single-device reference of the same schedule).

    Example: archipelago generate-video --expert runs/moving-digits-video/experts/expert-0/final
    --frames 256 --block 8 --num-cat 2 --steps 16 --world-size 2 --launcher torchrun --out video.gif
    By hand: torchrun --standalone --nproc-per-node 2 -m archipelago.inference.video_cli --expert CKPT
    --frames 256 --out video.gif
    """
    from archipelago.errors import ConfigError
    from archipelago.inference.progress import run_with_bar
    from archipelago.inference.video_cli import VideoSpec, generate_video

    try:
        label_list = [int(v) for v in labels.split(",")]
    except ValueError:
        raise ConfigError(f"generate-video: --labels {labels!r} must be comma-separated integers") from None
    spec = VideoSpec.create(expert=expert, frames=frames, block=block, num_cat=num_cat, steps=steps,
                            cfg_scale=cfg_scale, labels=label_list, seed=seed, noise=noise, positions=positions,
                            device=device, out=out, tensor_out=tensor_out, stats=stats)
    t0 = time.perf_counter()
    ranks = run_with_bar(lambda steps: generate_video(spec.model_copy(update={"progress": steps}),
                                                      world_size=world_size, launcher=launcher),
                         "dualparal", spec.dualparal().num_iterations, verbose, "generate-video", typer.echo)
    r0 = ranks[0]
    sent = sum(r["comm"].get("total_bytes", 0) for r in ranks)
    typer.echo(f"{frames} frames ({r0['describe']}) in {time.perf_counter() - t0:.1f}s, pipeline "
               f"{max(r['latency_s'] for r in ranks):.2f}s, {sent / 2**20:.1f} MiB sent -> {out} + "
               f"{spec.tensor_url()}")


def main() -> None:
    debug = os.environ.get("ARCHIPELAGO_DEBUG") == "1" or "--debug" in sys.argv[1:]
    try:
        app()
    except ArchipelagoError as exc:
        if debug:
            raise
        from rich.markup import escape

        from archipelago.storage import redact

        line = " ".join(redact(str(exc)).split("\n"))
        # escape: a path like runs/[exp1]/cfg.yaml is the culprit to name, not rich markup to swallow
        console.print(f"[bold red]{exc.label}:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
