"""`archipelago train`: data -> islands in parallel with the router -> ensemble.json -> samples -> eval, every
stage idempotent, so running the same command again finishes what is missing and redoes nothing.

    <root>/data/                    shards + manifest.json           (prepare_data reuses valid data)
    <root>/experts/expert-{k}/      checkpoints/, final/, metrics.jsonl (an island per shard; complete ones skipped)
    <root>/router/                  router.safetensors + meta.json     (the router job, beside the islands)
    <root>/ensemble.json            experts + router + data hashes     (only when every island and the router are done)
    <root>/samples/*.png            a grid sampled from the ensemble (+ samples.safetensors for eval)
    <root>/eval.json                feature distance of those samples to the data
    <root>/pipeline.json            the last run's summary: one entry per island, the router, each stage
    <root>/ray/island-{k}/          Ray Train's own run state;  <root>/mlruns.db: the default MLflow store

An island that fails for good does not stop the others: the run ends with a summary naming it, no
ensemble is written, and the next run trains only the missing experts.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archipelago import storage
from archipelago.cluster.spec import ClusterSpec, IslandPlan
from archipelago.config import ArchipelagoConfig, island_expert_config
from archipelago.errors import ArchipelagoError, ConfigError, failure_line
from archipelago.experts.callbacks import TrainCallback
from archipelago.orchestration.islands import IslandResult, run_islands
from archipelago.orchestration.progress import IslandBoard
from archipelago.orchestration.tracking import Tracker, read_metrics_jsonl

log = logging.getLogger(__name__)

SUMMARY_FILE = "pipeline.json"
EVAL_FILE = "eval.json"


class IslandsFailed(ArchipelagoError):
    """Some islands (or the router) failed for good; the others finished and are kept."""


@dataclass
class RouterOutcome:
    status: str                     # trained | skipped | failed
    url: str
    steps: int | None = None
    final_loss: float | None = None
    accuracy: float | None = None
    wall_s: float = 0.0
    error: str | None = None
    run_id: str | None = None


@dataclass
class PipelineResult:
    """What one `archipelago train` did; `ok` when every island and the router are done."""
    root: str
    islands: list[IslandResult]
    router: RouterOutcome
    ensemble: str | None = None
    grid: str | None = None
    eval: dict[str, Any] | None = None
    parent_run_id: str | None = None
    registered_version: str | None = None
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[IslandResult]:
        return [r for r in self.islands if not r.ok]

    @property
    def ok(self) -> bool:
        return not self.failed and self.router.status != "failed"

    @property
    def trainers_started(self) -> int:
        """Islands that ran (trained now or failed) — skipped ones start no trainer."""
        return sum(r.status != "skipped" for r in self.islands)

    def table(self) -> str:
        """One line per island and one for the router."""
        rows = [("island", "shard", "status", "steps", "loss", "time", "checkpoint / error")]
        for r in self.islands:
            rows.append((r.name, str(r.shard), r.status.upper() if r.status == "failed" else r.status,
                         "-" if r.steps is None else str(r.steps),
                         "-" if r.final_loss is None else f"{r.final_loss:.4f}", f"{r.wall_s:.1f}s",
                         r.error if r.status == "failed" else (r.final_checkpoint or "")))
        ro = self.router
        rows.append(("router", "-", ro.status.upper() if ro.status == "failed" else ro.status,
                     "-" if ro.steps is None else str(ro.steps),
                     "-" if ro.final_loss is None else f"{ro.final_loss:.4f}", f"{ro.wall_s:.1f}s",
                     ro.error if ro.status == "failed" else ro.url))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows)

    def failure_lines(self) -> list[str]:
        """One line per failed island / router, naming its error (the live table shows only the status)."""
        lines = [f"{r.name}: FAILED: {r.error}" for r in self.failed]
        if self.router.status == "failed":
            lines.append(f"router: FAILED: {self.router.error}")
        return lines

    def raise_if_failed(self) -> None:
        """IslandsFailed naming what failed; what succeeded is kept, so the same command resumes the rest."""
        if self.ok:
            return
        names = [r.name for r in self.failed] + (["router"] if self.router.status == "failed" else [])
        raise IslandsFailed(f"{', '.join(names)} failed (see above; summary in {self.root}/pipeline.json); the "
                            f"other islands are kept — fix the cause and re-run the same command to train only "
                            f"what is missing")

    def done_line(self, seconds: float) -> str:
        """The last line of `archipelago train`: where the ensemble and grid are, the score, the MLflow run."""
        fd = (self.eval or {}).get("feature_distance")
        return (f"done in {seconds:.1f}s: ensemble {self.ensemble}, grid {self.grid}"
                + (f", feature distance {fd:.3f}" if isinstance(fd, float) else "")
                + (f", MLflow run {self.parent_run_id}" if self.parent_run_id else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "ok": self.ok, "islands": [r.to_dict() for r in self.islands],
                "router": self.router.__dict__, "ensemble": self.ensemble, "grid": self.grid, "eval": self.eval,
                "parent_run_id": self.parent_run_id, "registered_version": self.registered_version,
                "stages": self.stages}


def output_map(cfg: ArchipelagoConfig) -> list[tuple[str, str]]:
    """(what, where) of every output a pipeline run writes under storage.root: the map `quickstart` prints."""
    root = cfg.storage.root
    lines = [("data shards + manifest", storage.join(root, "data")),
             ("expert checkpoints", storage.join(root, "experts", "expert-<k>", "final")),
             ("router", storage.join(root, "router")),
             ("ensemble", storage.join(root, "ensemble.json")),
             ("sample grids (PNG)", storage.join(root, "samples")),
             ("evaluation", storage.join(root, "eval.json"))]
    if cfg.tracking.enabled:
        from archipelago.orchestration.tracking import resolve_tracking_uri

        lines.append(("MLflow UI", f"mlflow ui --backend-store-uri {resolve_tracking_uri(cfg)}"))
    return lines


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------

def resolve_root(cfg: ArchipelagoConfig) -> ArchipelagoConfig:
    """cfg with storage.root made absolute (local), so every process — workers with another working
    directory, jobs on other clusters — writes to the same place. memory:// is refused (not shared)."""
    root = cfg.storage.root
    if storage.scheme(root) == "memory":
        raise ConfigError(f"field 'storage.root': {root} lives in one process; islands run in others — use a "
                          f"local directory or s3://")
    if not storage.is_local(root):
        return cfg
    absolute = str(storage.local_path(root).expanduser().resolve())
    if absolute == root:
        return cfg
    out = cfg.model_copy(deep=True)
    out.storage.root = absolute
    return out


def connect_ray(spec: ClusterSpec) -> bool:
    """ray.init for the driver (unless already initialised); returns True when the cluster is local without
    an autoscaler (islands that cannot fit then fail at once instead of waiting forever)."""
    from archipelago.cluster.local import connect_ray as connect

    local = spec.address is None and os.environ.get("RAY_ADDRESS", "") in ("", "local")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    connect(spec.address, hint="check islands.address / RAY_ADDRESS", logging_level=logging.WARNING,
            configure_logging=True)
    return local


def _island_tags(plan: IslandPlan, cfg: ArchipelagoConfig, manifest_sha: str) -> dict[str, Any]:
    return {"archipelago.kind": "island", "archipelago.island": plan.name, "archipelago.shard": plan.shard,
            "archipelago.shard_sha256": plan.shard_sha256, "archipelago.shard_count": plan.shard_count,
            "archipelago.data_manifest_sha256": manifest_sha, "archipelago.mode": plan.mode,
            "archipelago.config_hash": cfg.config_hash()}


def _island_params(plan: IslandPlan, cfg: ArchipelagoConfig) -> dict[str, Any]:
    # The expert config this island really trains with: its share of the budget under islands.flop_match.
    expert = island_expert_config(plan.island_config(cfg), cfg.data.num_clusters)
    return {"island": plan.params(), "expert": expert.model_dump(mode="json"), "flop_match": cfg.islands.flop_match}


# ----------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------

def run_pipeline(cfg: ArchipelagoConfig, callbacks: Sequence[TrainCallback] = (), progress: bool = False,
                 echo: Callable[[str], None] | None = None, board: IslandBoard | None = None) -> PipelineResult:
    """Run (or finish) the whole training pipeline for `cfg`; returns what happened.

    callbacks: extra TrainCallbacks for every island (pickled to the workers, called on every rank).
    echo: receives one human line per finished stage / island.
    board: a live table to declare the islands and the router on and to tell their outcomes.
    Does not raise for failed islands: check `result.ok` (the CLI turns it into IslandsFailed).
    """
    from archipelago.data.prepare import prepare_data
    from archipelago.data.shards import manifest_sha256

    say = echo or (lambda line: log.info("%s", line))
    stages: dict[str, float] = {}
    cfg = resolve_root(cfg)
    root = cfg.storage.root
    storage.ensure_reachable(root)

    # ---- data ----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    data_url = storage.join(root, "data")
    manifest = prepare_data(cfg.data, data_url, progress=progress)
    manifest_sha = manifest_sha256(data_url)
    stages["data_s"] = time.perf_counter() - t0
    say(f"data: K={manifest.num_clusters} shards {manifest.counts} at {data_url}")

    # ---- plans, tracking, Ray ------------------------------------------------------------------------
    spec = ClusterSpec.from_config(cfg, manifest, data_url=data_url, root=root)
    tracker = Tracker.open(cfg, root)
    run_ids = {p.shard: tracker.child(p.name, p.name, _island_params(p, cfg), _island_tags(p, cfg, manifest_sha))
               for p in spec.islands}
    router_run = tracker.child("router", "router", {"router": cfg.router.model_dump(mode="json")},
                               {"archipelago.kind": "router", "archipelago.data_manifest_sha256": manifest_sha})
    strict = connect_ray(spec)
    if board is not None:
        for plan in spec.islands:
            steps = island_expert_config(plan.island_config(cfg), cfg.data.num_clusters).steps
            board.add_island(plan.name, plan.shard, steps, plan.out_url)
        board.add_router(cfg.router.steps)

    # ---- islands || router ---------------------------------------------------------------------------
    from archipelago.orchestration.router_job import start_router

    t0 = time.perf_counter()
    router_ref = start_router(spec.router, cfg, spec.max_failures, tracker.worker_tracking(router_run))
    router_done = threading.Event()
    threading.Thread(target=_set_when_ready, args=(router_ref, router_done), daemon=True,
                     name="router-watch").start()

    def done(res: IslandResult) -> None:
        if board is not None:   # the table shows it
            board.finish(res.name, res.status, res.steps, res.final_loss)
            return
        say(f"{res.name}: {res.status}" + (f" ({res.error})" if res.error else
                                           f" -> {res.final_checkpoint}"))

    island_results = run_islands(
        spec.islands, cfg, root, max_concurrent=spec.max_concurrent, max_failures=spec.max_failures,
        reserved=spec.router.demand, reserved_done=router_done, strict_resources=strict,
        tracking={k: tracker.worker_tracking(r) for k, r in run_ids.items()}, callbacks=callbacks, on_done=done)
    router = _wait_router(router_ref, spec.router.out_url)
    router.run_id = router_run
    stages["train_s"] = time.perf_counter() - t0
    if board is not None:
        board.finish("router", router.status, router.steps, router.final_loss)
    else:
        say(f"router: {router.status}" + (f" ({router.error})" if router.error else f" -> {router.url}"))

    # ---- tracking of what ran ------------------------------------------------------------------------
    plans = {p.shard: p for p in spec.islands}
    for res in island_results:
        res.run_id = run_ids.get(res.shard)
        _track_island(tracker, plans[res.shard], res)
    _track_router(tracker, router)

    result = PipelineResult(root=root, islands=island_results, router=router, parent_run_id=tracker.parent_run_id,
                            stages=stages)
    if not result.ok:
        _write_summary(result)
        tracker.log_artifact(tracker.parent_run_id, storage.join(root, SUMMARY_FILE), "summary")
        tracker.close(ok=False)
        return result

    # ---- ensemble.json -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ensemble_url = storage.join(root, "ensemble.json")
    _ensemble(ensemble_url, {r.shard: r.final_checkpoint for r in island_results}, router.url, data_url, cfg,
              rewrite=any(r.status == "trained" for r in island_results) or router.status == "trained")
    result.ensemble = ensemble_url
    ensemble_sha = storage.sha256_url(ensemble_url)
    stages["ensemble_s"] = time.perf_counter() - t0
    say(f"ensemble: {ensemble_url}")

    # ---- samples + eval (reused when the ensemble and the inference settings are unchanged) -----------
    t0 = time.perf_counter()
    result.grid, result.eval = _samples_and_eval(cfg, ensemble_url, ensemble_sha, data_url)
    stages["samples_eval_s"] = time.perf_counter() - t0
    ev = result.eval
    say(f"samples: {result.grid}; eval vs {ev.get('reference_split', 'data')}: feature distance "
        f"{ev.get('feature_distance', float('nan')):.2f} (real-vs-real floor {ev.get('reference_floor') or float('nan'):.2f}), "
        f"class-consistency {ev.get('class_consistency') or float('nan'):.2f}")

    # ---- MLflow: artifacts, eval metrics, the registered ensemble ------------------------------------
    _write_summary(result)
    parent = tracker.parent_run_id
    tracker.log_metrics(parent, {f"eval.{k}": v for k, v in result.eval.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for url in (result.grid, storage.join(root, EVAL_FILE), storage.join(root, SUMMARY_FILE)):
        tracker.log_artifact(parent, url, "results")
    tracker.set_tags(parent, {"archipelago.ensemble_uri": ensemble_url, "archipelago.ensemble_sha256": ensemble_sha})
    result.registered_version = tracker.register_ensemble(
        cfg.name, ensemble_url, {"manifest": storage.join(data_url, "manifest.json")},
        {"archipelago.ensemble_uri": ensemble_url, "archipelago.data_manifest_sha256": manifest_sha,
         "archipelago.config_hash": cfg.config_hash()})
    tracker.close(ok=True)
    _write_summary(result)
    return result


def run_pipeline_live(cfg: ArchipelagoConfig, log_file: Path) -> PipelineResult:
    """`run_pipeline` with one live table of the islands on the terminal and every other output (Ray's,
    the workers', MLflow's) in `log_file`. A Ray instance started here is shut down inside, so that no late
    worker line reaches the terminal."""
    import ray

    from archipelago.orchestration.progress import LiveBoard
    from archipelago.quiet import quiet_output

    connected_before = ray.is_initialized()
    board = IslandBoard()
    with quiet_output(log_file) as (console, _), LiveBoard(board, console) as live:
        live.start()
        try:
            return run_pipeline(cfg, echo=live.echo, board=board)
        finally:
            if not connected_before and ray.is_initialized():
                ray.shutdown()


def _set_when_ready(ref: Any, event: threading.Event) -> None:
    """Set `event` once the router task has ended (either way): its CPU goes back to the islands."""
    import ray

    try:
        ray.wait([ref], num_returns=1)
    except Exception:  # noqa: BLE001 - Ray shut down under us: nothing left to give back
        return
    event.set()


def _wait_router(ref: Any, url: str) -> RouterOutcome:
    import ray

    t0 = time.perf_counter()
    try:
        out = ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - RayTaskError wrapping anything
        return RouterOutcome(status="failed", url=url, error=failure_line(exc), wall_s=time.perf_counter() - t0)
    metrics = out.get("metrics") or {}
    return RouterOutcome(status="skipped" if out.get("cached") else "trained", url=out.get("router", url),
                         steps=out.get("steps"), final_loss=out.get("final_loss"), accuracy=metrics.get("accuracy"),
                         wall_s=float(out.get("wall_s") or 0.0))


def _track_attempts(tracker: Tracker, res: IslandResult) -> None:
    """One MLflow run per job submission, nested in the island's run, when the island did not simply run
    once where it was placed: the attempt lost with its site (FAILED) and the one that resumed elsewhere."""
    if not res.run_id or (len(res.attempts) < 2 and all(a["status"] == "succeeded" for a in res.attempts)):
        return
    for a in res.attempts:
        key = f"{res.name}/attempt-{a['attempt']}@{a['started_at']:.0f}"
        run_id = tracker.child(key, f"{res.name} attempt {a['attempt']}",
                               {"attempt": a["attempt"], "site": a["address"], "job_id": a["job_id"]},
                               {"archipelago.kind": "island_attempt", "archipelago.island": res.name,
                                "archipelago.site": a["address"], "archipelago.status": a["status"],
                                "archipelago.error": a["error"]})
        tracker.set_tags(run_id, {"mlflow.parentRunId": res.run_id})
        tracker.end(run_id, ok=a["status"] == "succeeded")


def _track_island(tracker: Tracker, plan: IslandPlan, res: IslandResult) -> None:
    run_id = res.run_id
    if not run_id:
        return
    _track_attempts(tracker, res)
    tags = {"archipelago.status": res.status, "archipelago.error": res.error,
            "archipelago.checkpoint_uri": res.final_checkpoint}
    tracker.set_tags(run_id, tags)
    if res.ok:
        metrics_url = storage.join(plan.out_url, "metrics.jsonl")
        if plan.mode == "job" and res.status == "trained":
            # Trained on another cluster by `archipelago train-expert`: import its per-step metrics.
            tracker.log_metric_rows(run_id, read_metrics_jsonl(metrics_url))
        tracker.log_metrics(run_id, {"final_loss": res.final_loss, "island_wall_s": res.wall_s},
                            step=res.steps or 0)
        tracker.log_artifact(run_id, storage.join(res.final_checkpoint, "meta.json"), "checkpoint")
        tracker.log_artifact(run_id, metrics_url)
    tracker.end(run_id, ok=res.ok)


def _track_router(tracker: Tracker, router: RouterOutcome) -> None:
    if not router.run_id:
        return
    tracker.set_tags(router.run_id, {"archipelago.status": router.status, "archipelago.error": router.error,
                                     "archipelago.checkpoint_uri": router.url})
    if router.status != "failed":
        tracker.log_metrics(router.run_id, {"final_loss": router.final_loss, "accuracy": router.accuracy},
                            step=router.steps or 0)
        tracker.log_artifact(router.run_id, storage.join(router.url, "meta.json"), "checkpoint")
    tracker.end(router.run_id, ok=router.status != "failed")


def _ensemble(url: str, experts: dict[int, str], router_url: str, data_url: str, cfg: ArchipelagoConfig,
              rewrite: bool) -> None:
    """Write ensemble.json, unless nothing was retrained and the existing one records the same parts (its
    bytes, and so its sha256, samples and registry entry, then stay as they are)."""
    from archipelago.ensemble import read_spec, write_ensemble
    from archipelago.errors import EnsembleError

    if not rewrite and storage.exists(url):
        try:
            spec = read_spec(url)
            same = (spec.experts == experts and spec.router == router_url and spec.data_url == data_url
                    and spec.config_hash == cfg.config_hash() and spec.name == cfg.name)
        except EnsembleError:
            same = False
        if same:
            log.info("%s: current; reused", url)
            return
    write_ensemble(url, experts, router_url, data_url, config_hash=cfg.config_hash(), name=cfg.name)


def _samples_and_eval(cfg: ArchipelagoConfig, ensemble_url: str, ensemble_sha: str,
                      data_url: str) -> tuple[str, dict[str, Any]]:
    """Sample cfg.inference.num_samples from the ensemble (routing cfg.inference.routing), write the grid and
    the samples, score them; reused when eval.json names the same ensemble and settings."""
    from archipelago.eval.metrics import evaluate_samples
    from archipelago.generate import (
        default_classes,
        generate,
        load_sampler_model,
        save_samples,
        to_pixels,
        write_picture,
    )

    root = cfg.storage.root
    inf, e = cfg.inference, cfg.expert
    grid_url = storage.join(root, "samples", f"grid-{inf.routing}.png")
    samples_url = storage.join(root, "samples", "samples.safetensors")
    eval_url = storage.join(root, EVAL_FILE)
    settings = {"ensemble_sha256": ensemble_sha, "routing": inf.routing, "num_samples": inf.num_samples,
                "seed": inf.seed, "cfg_scale": e.cfg_scale, "sample_steps": e.sample_steps, "sampler": e.sampler}
    if storage.exists(eval_url) and storage.exists(grid_url):
        previous = storage.read_json(eval_url)
        if isinstance(previous, dict) and previous.get("settings") == settings:
            log.info("%s: samples and eval are current; reused", eval_url)
            return grid_url, previous
    model = load_sampler_model(ensemble_url, mode=inf.routing)
    labels = default_classes(inf.num_samples, model.num_classes)
    x = generate(model, inf.num_samples, cfg_scale=e.cfg_scale, seed=inf.seed, steps=e.sample_steps,
                 sampler=e.sampler, classes=labels)
    write_picture(to_pixels(x, getattr(model, "data_space", None), ensemble_url), grid_url)
    save_samples(samples_url, x, labels, meta=settings)
    scores = evaluate_samples(x, labels, data_url)
    out = {**scores, "settings": settings, "ensemble": ensemble_url, "grid": grid_url, "samples": samples_url,
           "expert_calls": getattr(model, "expert_calls", None)}
    storage.write_json(eval_url, out)
    return grid_url, out


def _write_summary(result: PipelineResult) -> None:
    storage.write_json(storage.join(result.root, SUMMARY_FILE), {**result.to_dict(), "written_at": time.time()})
