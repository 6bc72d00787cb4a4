"""Islands: each expert trains as an independent Ray Train job, and one island failing never stops another.

    plan (cluster.spec.IslandPlan)
      mode "ray" -> TorchTrainer(island_train_fn, ScalingConfig(workers, GPU, resources, labels),
                                 TorchConfig(gloo | nccl), RunConfig(name="island-k", storage under the root,
                                 FailureConfig(max_failures))).fit()      started from a driver thread
      mode "job" -> JobSubmissionClient(http://host:8265).submit_job("archipelago train-expert --shard k ...")
                    on the island's own Ray cluster, polled, resubmitted up to max_failures times

The train function calls `train_expert`, which checkpoints to shared storage and resumes from its own last
complete checkpoint: when Ray restarts a failed worker group (or the whole pipeline is run again) training
continues from there. `ray.train.report` is called at every checkpoint on every rank (a barrier: rank 0
attaches a pointer to the checkpoint, the others None), never per step. Results come from our checkpoint
metadata, not `Result.metrics` (Ray Train V2 keeps metrics only with checkpoints). An island whose final
checkpoint is complete, verifies (sha256 of every file) and matches its shard and expert config is skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from archipelago import storage
from archipelago.cluster.spec import TRAINING_FIELDS_EXCLUDED, IslandPlan, job_sites, redact_address
from archipelago.config import ArchipelagoConfig, dump_config, island_expert_config
from archipelago.errors import (
    ArchipelagoError,
    CheckpointError,
    ConfigError,
    DivergenceError,
    StorageError,
    failure_line,
)
from archipelago.experts.callbacks import TrainCallback
from archipelago.orchestration.sites import JobAttempt, SiteBoard, SiteLost, poll_job

log = logging.getLogger(__name__)

IslandStatus = Literal["trained", "skipped", "failed"]


@dataclass
class IslandResult:
    """How one island ended; `status` is trained (ran now), skipped (already complete) or failed."""
    shard: int
    name: str
    status: IslandStatus
    mode: str
    final_checkpoint: str | None = None
    steps: int | None = None
    start_step: int | None = None
    final_loss: float | None = None
    wall_s: float = 0.0
    error: str | None = None
    run_id: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)   # job mode: one per submission (sites.JobAttempt)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# Is an island already done?
# ----------------------------------------------------------------------------------------------------

def training_fields(expert: dict[str, Any]) -> dict[str, Any]:
    """The expert-config fields that determine the trained weights."""
    return {k: v for k, v in expert.items() if k not in TRAINING_FIELDS_EXCLUDED}


def completed_expert(plan: IslandPlan, cfg: ArchipelagoConfig, data_manifest_sha256: str | None = None
                     ) -> dict[str, Any] | None:
    """meta.json of island `plan`'s final checkpoint if it is complete and current, else None.

    Current = every file matches its sha256 in meta.json; it was trained on this shard (id and sha256) of
    this data manifest, for expert.steps steps, with the same weight-determining expert config (strategy,
    checkpoint cadence and sampling settings may differ).
    """
    from archipelago.experts import checkpoint as ckpt

    final = storage.join(plan.out_url, "final")
    meta = ckpt.verified_or_none(final, "the island trains again")
    if meta is None:
        return None
    if data_manifest_sha256 is None:
        from archipelago.data.shards import manifest_sha256

        data_manifest_sha256 = manifest_sha256(plan.data_url)
    island = island_expert_config(cfg, cfg.data.num_clusters)   # what the island trains with (flop_match)
    want = training_fields(island.model_dump(mode="json"))
    checks = {"final": (meta.get("final"), True), "step": (meta.get("step"), island.steps),
              "shard": (meta.get("shard"), plan.shard), "shard_sha256": (meta.get("shard_sha256"), plan.shard_sha256),
              "data_manifest_sha256": (meta.get("data_manifest_sha256"), data_manifest_sha256),
              "expert": (training_fields(meta.get("expert") or {}), want)}
    stale = [k for k, (have, expected) in checks.items() if have != expected]
    if stale:
        log.info("%s: final checkpoint is stale (%s differ); the island trains again", final, ", ".join(stale))
        return None
    return meta


def result_from_meta(plan: IslandPlan, meta: dict[str, Any], status: IslandStatus, wall_s: float = 0.0,
                     start_step: int | None = None) -> IslandResult:
    return IslandResult(shard=plan.shard, name=plan.name, status=status, mode=plan.mode,
                        final_checkpoint=storage.join(plan.out_url, "final"), steps=int(meta.get("step", 0)),
                        start_step=start_step if start_step is not None else
                        (meta.get("metrics") or {}).get("start_step"),
                        final_loss=(meta.get("metrics") or {}).get("loss"), wall_s=wall_s)


# ----------------------------------------------------------------------------------------------------
# Inside a Ray Train worker
# ----------------------------------------------------------------------------------------------------

class RayReportCallback(TrainCallback):
    """`ray.train.report` at every checkpoint, on every rank (the report is a barrier); rank 0 attaches a
    small Ray checkpoint that points at ours in shared storage, so Ray's view of progress matches ours."""

    def __init__(self) -> None:
        self.rank = 0
        self.metrics: dict[str, float] = {}

    def on_start(self, info: dict[str, Any]) -> None:
        self.rank = int(info.get("rank", 0))

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics = dict(metrics)

    def on_checkpoint(self, step: int, url: str) -> None:
        import ray.train

        metrics = {**self.metrics, "step": step}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="archipelago-pointer-") as tmp:
            Path(tmp, "pointer.json").write_text(json.dumps({"url": url, "step": step}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def island_train_fn(config: dict[str, Any]) -> None:
    """The Ray Train train function of one island: runs on every worker of the island's TorchTrainer, where
    Ray has already initialised torch.distributed (gloo or NCCL)."""
    # ---- environment: no inherited MLflow run may redirect our logging ----------------------------------
    os.environ.pop("MLFLOW_RUN_ID", None)
    import ray.train
    import torch

    from archipelago.experts.train import train_expert
    from archipelago.orchestration.tracking import MlflowMetricsCallback

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(int(config.get("threads", 1)))
    cfg = ArchipelagoConfig.model_validate(config["config"])
    shard, out_url = int(config["shard"]), config["out_url"]

    # ---- callbacks: Ray progress reports, MLflow metrics (rank 0), the caller's -----------------------
    callbacks: list[TrainCallback] = [RayReportCallback()]
    if config.get("tracking"):
        callbacks.append(MlflowMetricsCallback(**config["tracking"]))
    callbacks.extend(config.get("callbacks") or ())

    # ---- resume: our own checkpoints are the truth; Ray's pointer only says how far Ray saw us get -----
    restored = ray.train.get_checkpoint()
    if restored is not None and ray.train.get_context().get_world_rank() == 0:
        with restored.as_directory() as d:
            pointer = json.loads(Path(d, "pointer.json").read_text())
        log.info("island %d: Ray restored this island's run state (a restarted worker group or a re-run); last "
                 "reported checkpoint %s (step %s); resuming from our newest complete one", shard,
                 pointer.get("url"), pointer.get("step"))

    # ---- train -------------------------------------------------------------------------------------------
    # A divergence is deterministic: retrying the worker group would only diverge again from the same
    # checkpoint. Every rank raises it at the same step; rank 0 records it for the driver and all return.
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        storage.remove(storage.join(out_url, DIVERGED_FILE))
    try:
        # A restarted worker group waits out the lease of an attempt that died on another node.
        train_expert(cfg, shard, config["data_url"], out_url, callbacks=callbacks, resume=True,
                     lease_wait_s=1.5 * cfg.expert.lease_ttl_s)
    except DivergenceError as exc:
        if rank == 0:
            storage.write_json(storage.join(out_url, DIVERGED_FILE), {"error": str(exc), "time": time.time()})


DIVERGED_FILE = "diverged.json"


def diverged_error(out_url: str) -> DivergenceError | None:
    """The divergence an island's workers recorded (they return normally so Ray does not retry it)."""
    url = storage.join(out_url, DIVERGED_FILE)
    try:
        return DivergenceError(storage.read_json(url)["error"]) if storage.exists(url) else None
    except (StorageError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------------
# From the driver: one island
# ----------------------------------------------------------------------------------------------------

def ray_storage(root: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's own run state under <root>/ray.

    Local roots give an absolute path. S3 roots go through s3fs wrapped for pyarrow (pyarrow's own S3
    ignores AWS_ENDPOINT_URL), with the path given without s3://.
    """
    url = storage.join(root, "ray")
    if storage.is_local(url):
        return str(storage.local_path(url).resolve()), None
    if storage.scheme(url) in ("s3", "s3a"):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = storage.filesystem(url)
        return path, PyFileSystem(FSSpecHandler(fs))
    raise ConfigError(f"field 'storage.root': {url} cannot hold Ray Train state (islands run in other processes); "
                      f"use a local directory or s3://")


def make_trainer(plan: IslandPlan, cfg: ArchipelagoConfig, root: str, max_failures: int,
                 tracking: dict[str, str] | None = None, callbacks: Sequence[TrainCallback] = ()) -> Any:
    """The TorchTrainer of one island (not started)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, storage_fs = ray_storage(root)
    scaling_kw: dict[str, Any] = {}
    if plan.label_selector:
        scaling_kw["label_selector"] = dict(plan.label_selector)
    train_config = {"config": plan.island_config(cfg).model_dump(mode="json"), "shard": plan.shard,
                    "data_url": plan.data_url, "out_url": plan.out_url, "tracking": tracking,
                    "callbacks": list(callbacks), "threads": max(1, int(plan.cpus_per_worker))}
    return TorchTrainer(
        island_train_fn, train_loop_config=train_config,
        scaling_config=ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                     resources_per_worker=plan.resources_per_worker, **scaling_kw),
        torch_config=TorchConfig(backend=plan.backend),
        run_config=RunConfig(name=plan.name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))


def run_island(plan: IslandPlan, cfg: ArchipelagoConfig, root: str, max_failures: int,
               tracking: dict[str, str] | None = None, callbacks: Sequence[TrainCallback] = (),
               data_manifest_sha256: str | None = None, sites: SiteBoard | None = None) -> IslandResult:
    """Train one island to completion (blocking) and say how it ended; never raises for a training failure.
    sites: the run's SiteBoard (job mode: where a lost site's island may move)."""
    t0 = time.perf_counter()
    attempts: list[JobAttempt] = []
    try:
        if plan.mode == "job":
            run_island_job(plan, cfg, max_failures, sites=sites, attempts=attempts)
        else:
            make_trainer(plan, cfg, root, max_failures, tracking, callbacks).fit()
        meta = completed_expert(plan, cfg, data_manifest_sha256)
        if meta is None and plan.mode == "ray" and (diverged := diverged_error(plan.out_url)) is not None:
            raise diverged
        if meta is None:
            raise CheckpointError(f"{storage.join(plan.out_url, 'final')}: training ended without a complete "
                                  f"final checkpoint")
        res = result_from_meta(plan, meta, "trained", time.perf_counter() - t0)
        res.attempts = [a.to_dict() for a in attempts]
        return res
    except Exception as exc:  # noqa: BLE001 - one island's failure of any kind must not stop the others
        line = failure_line(exc)
        log.error("%s (shard %d) failed: %s", plan.name, plan.shard, line)
        return IslandResult(shard=plan.shard, name=plan.name, status="failed", mode=plan.mode,
                            wall_s=time.perf_counter() - t0, error=line, attempts=[a.to_dict() for a in attempts])


def job_entrypoint(plan: IslandPlan, config_file: str, lease_wait_s: float = 0.0) -> str:
    """The command an island's own cluster runs: `archipelago train-expert` for one worker, the island's
    TorchTrainer on that cluster (this module's main) for more. lease_wait_s: how long train-expert waits
    out the lease of an attempt that died with its site (another host: its lease must expire)."""
    args = (f"--shard {plan.shard} --config {shlex.quote(config_file)} --data {shlex.quote(plan.data_url)} "
            f"--out {shlex.quote(plan.out_url)}")
    if plan.num_workers == 1 and not plan.use_gpu:
        wait = f" --lease-wait-s {lease_wait_s:g}" if lease_wait_s > 0 else ""
        return f"archipelago train-expert {args}{wait}"
    return f"python -m archipelago.orchestration.islands {args}"


def run_island_job(plan: IslandPlan, cfg: ArchipelagoConfig, max_failures: int, poll_s: float = 2.0,
                   timeout_s: float | None = None, sites: SiteBoard | None = None,
                   attempts: list[JobAttempt] | None = None) -> str:
    """Submit island `plan` as a Ray job to its own cluster (plan.address = http://host:8265) and wait;
    resubmits up to max_failures times (each attempt resumes from the last checkpoint). Returns the job id.

    A site whose dashboard stops answering is lost (sites.SiteLost): under islands.on_site_loss=resubmit the
    island moves to the next surviving site of `sites`, which resumes it from its last checkpoint in the
    shared store (a move is not one of the max_failures). Every submission is appended to `attempts`.

    The job gets the island's config as a file in its working directory; no credential travels with it
    (the island's cluster reads the store with its own credentials) and MLFLOW_RUN_ID is not forwarded.
    """
    from ray.job_submission import JobStatus

    sites = sites or SiteBoard([plan.address or ""], cfg.islands.on_site_loss, cfg.islands.site_loss_timeout_s)
    attempts = attempts if attempts is not None else []
    address = plan.address or ""
    deadline = None if timeout_s is None else time.time() + timeout_s
    failures, last_error = 0, ""
    while True:
        record = JobAttempt(attempt=len(attempts) + 1, address=redact_address(address) or "", job_id=None,
                            status="running", started_at=time.time())
        attempts.append(record)
        try:
            record.job_id = _submit(plan, cfg, address, record.attempt)
            status = poll_job(_client_for(plan, address), record.job_id, address, plan.name, sites.timeout_s,
                              poll_s, deadline)
        except SiteLost as exc:
            record.status, record.error, record.ended_at = "site_lost", str(exc), time.time()
            log.error("%s", exc)
            if sites.policy != "resubmit":
                raise
            moved_to = sites.next_site(address)
            if moved_to is None:
                raise SiteLost(f"{exc}; no surviving site to resubmit it to (islands.sites)") from None
            log.warning("%s: resubmitting to the surviving site %s (on_site_loss=resubmit); it resumes from the "
                        "last checkpoint in the store", plan.name, redact_address(moved_to))
            address = moved_to
            continue
        record.ended_at = time.time()
        if status == JobStatus.SUCCEEDED:
            record.status = "succeeded"
            return record.job_id
        last_error = _job_error(_client_for(plan, address), record.job_id)
        record.status, record.error = "failed", last_error
        log.warning("%s: job %s %s: %s", plan.name, record.job_id, status, last_error)
        failures += 1
        if failures > max_failures:
            raise IslandJobError(f"{plan.name}: job failed {failures} time(s) on {redact_address(address)}: "
                                 f"{last_error}")


def _client_for(plan: IslandPlan, address: str) -> Any:
    """The job client of a site; SiteLost (at once) when its dashboard cannot be reached at all."""
    from archipelago.cluster.local import job_client

    try:
        return job_client(address)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ...
        raise SiteLost(f"{plan.name}: cannot reach the Ray dashboard at {redact_address(address)} "
                       f"({type(exc).__name__}); is the island's cluster up?") from None


def _submit(plan: IslandPlan, cfg: ArchipelagoConfig, address: str, attempt: int) -> str:
    """Submit one attempt of the island's job to the site at `address`; returns the job id."""
    client = _client_for(plan, address)
    with tempfile.TemporaryDirectory(prefix=f"archipelago-{plan.name}-") as wd:
        Path(wd, "island.yaml").write_text(dump_config(plan.island_config(cfg)))
        entry = job_entrypoint(plan, "island.yaml", lease_wait_s=1.5 * cfg.expert.lease_ttl_s)
        kw: dict[str, Any] = {"entrypoint_num_cpus": plan.cpus_per_worker}
        if plan.use_gpu and plan.num_workers == 1:
            kw["entrypoint_num_gpus"] = plan.gpus_per_worker
        if plan.resources and plan.num_workers == 1:
            kw["entrypoint_resources"] = dict(plan.resources)
        try:
            job_id = client.submit_job(
                entrypoint=entry, runtime_env={"working_dir": wd, "env_vars": {"MLFLOW_RUN_ID": ""}},
                metadata={"archipelago.island": plan.name, "archipelago.shard": str(plan.shard),
                          "archipelago.attempt": str(attempt)}, **kw)
        except (ConnectionError, OSError) as exc:
            raise SiteLost(f"{plan.name}: the site {redact_address(address)} refused the job "
                           f"({type(exc).__name__})") from None
    log.info("%s: submitted job %s to %s (attempt %d): %s", plan.name, job_id, redact_address(address), attempt,
             entry)
    return job_id


class IslandJobError(ArchipelagoError):
    """An island's Ray job on its own cluster failed for good."""


def _job_error(client: Any, job_id: str) -> str:
    try:
        logs = client.get_job_logs(job_id)
    except Exception:  # noqa: BLE001
        logs = ""
    lines = [ln.strip() for ln in logs.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error" in ln.split(" ", 1)[0]:
            return storage.redact(ln[:300])
    info = client.get_job_info(job_id)
    return storage.redact((info.message or "no message")[:300])


# ----------------------------------------------------------------------------------------------------
# From the driver: all islands, concurrently as far as resources allow
# ----------------------------------------------------------------------------------------------------

class ResourceGate:
    """Admit islands while at most `max_concurrent` run and the demands of those running fit in `total`.

    A trainer needs all its workers at once; starting more trainers than fit only makes them wait on each
    other's placement groups. An island larger than the whole budget is admitted alone (an autoscaler may
    add nodes); `strict` (a local cluster without one) fails it instead.
    """

    def __init__(self, total: dict[str, float], max_concurrent: int, strict: bool = False):
        self.total = dict(total)
        self.max_concurrent = max_concurrent
        self.strict = strict
        self.used: dict[str, float] = {}
        self.running = 0
        self._cv = threading.Condition()

    def too_big(self, demand: dict[str, float]) -> str | None:
        over = {k: v for k, v in demand.items() if v > self.total.get(k, 0.0) + 1e-9}
        if not over:
            return None
        have = {k: self.total.get(k, 0.0) for k in over}
        return f"needs {over} but the Ray cluster has {have}"

    def _fits(self, demand: dict[str, float]) -> bool:
        if self.running >= self.max_concurrent:
            return False
        if self.running == 0:
            return True
        return all(self.used.get(k, 0.0) + v <= self.total.get(k, 0.0) + 1e-9 for k, v in demand.items())

    def acquire(self, demand: dict[str, float]) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._fits(demand))
            self.running += 1
            for k, v in demand.items():
                self.used[k] = self.used.get(k, 0.0) + v

    def grow(self, extra: dict[str, float]) -> None:
        """Give back what was held for something beside the islands (the router) once it is done."""
        with self._cv:
            for k, v in extra.items():
                self.total[k] = self.total.get(k, 0.0) + v
            self._cv.notify_all()

    def release(self, demand: dict[str, float]) -> None:
        with self._cv:
            self.running -= 1
            for k, v in demand.items():
                self.used[k] = self.used.get(k, 0.0) - v
            self._cv.notify_all()


def run_islands(plans: Sequence[IslandPlan], cfg: ArchipelagoConfig, root: str, *, max_concurrent: int,
                max_failures: int, cluster_resources: dict[str, float] | None = None,
                reserved: dict[str, float] | None = None, reserved_done: threading.Event | None = None,
                strict_resources: bool = False,
                tracking: dict[int, dict[str, str] | None] | None = None,
                callbacks: Sequence[TrainCallback] = (),
                on_done: Callable[[IslandResult], None] | None = None) -> list[IslandResult]:
    """Train every island not already complete; returns one IslandResult per plan, in shard order.

    cluster_resources: the driver cluster's totals (default: ray.cluster_resources()); reserved: what runs
    beside the islands (the router), given back to the islands when `reserved_done` is set (on 2 CPUs the
    router's CPU would otherwise keep every island but one waiting long after the router is done). tracking: per shard, MlflowMetricsCallback kwargs. callbacks: extra
    TrainCallbacks pickled to every worker (called on every rank). on_done: called (from a worker thread) as
    each island ends.
    """
    from archipelago.data.shards import manifest_sha256

    results: dict[int, IslandResult] = {}
    todo: list[IslandPlan] = []
    shas: dict[str, str] = {}
    for plan in plans:
        sha = shas.setdefault(plan.data_url, manifest_sha256(plan.data_url))
        meta = completed_expert(plan, cfg, sha)
        if meta is not None:
            results[plan.shard] = result_from_meta(plan, meta, "skipped")
            log.info("%s: already trained (%s); skipped", plan.name, results[plan.shard].final_checkpoint)
            if on_done is not None:
                on_done(results[plan.shard])
        else:
            todo.append(plan)
    if not todo:
        return [results[p.shard] for p in plans]

    if cluster_resources is None and any(p.mode == "ray" for p in todo):
        import ray

        cluster_resources = {k: float(v) for k, v in ray.cluster_resources().items()}
    budget = dict(cluster_resources or {})
    for k, v in (reserved or {}).items():
        budget[k] = max(0.0, budget.get(k, 0.0) - v)
    gate = ResourceGate(budget, max_concurrent, strict=strict_resources)
    if reserved and reserved_done is not None:
        def give_back() -> None:
            reserved_done.wait()
            gate.grow(reserved)

        threading.Thread(target=give_back, daemon=True, name="reserved-release").start()
    sites = SiteBoard(job_sites(cfg, list(plans)), cfg.islands.on_site_loss, cfg.islands.site_loss_timeout_s)

    def one(plan: IslandPlan) -> IslandResult:
        demand = plan.demand if plan.mode == "ray" else {}
        problem = gate.too_big(demand) if demand else None
        if problem and strict_resources:
            res = IslandResult(shard=plan.shard, name=plan.name, status="failed", mode=plan.mode,
                               error=f"{problem}; lower islands.num_workers / cpus_per_worker or add resources")
        else:
            if problem:
                log.warning("%s %s; it starts alone and waits for the cluster to grow", plan.name, problem)
            gate.acquire(demand)
            try:
                res = run_island(plan, cfg, root, max_failures, (tracking or {}).get(plan.shard), callbacks,
                                 shas[plan.data_url], sites)
            finally:
                gate.release(demand)
        if on_done is not None:
            on_done(res)
        return res

    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), max_concurrent)),
                            thread_name_prefix="island") as pool:
        for plan, res in zip(todo, pool.map(one, todo)):
            results[plan.shard] = res
    return [results[p.shard] for p in plans]


# ----------------------------------------------------------------------------------------------------
# Entry point for an island on a cluster of its own: python -m archipelago.orchestration.islands
# ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Run one island's TorchTrainer on the Ray cluster this process is on (a job's driver)."""
    from archipelago.cluster.spec import resolve_islands
    from archipelago.config import load_config
    from archipelago.data.shards import load_manifest

    p = argparse.ArgumentParser(prog="python -m archipelago.orchestration.islands",
                                description="Train one island (Ray Train) on the current Ray cluster.",
                                epilog="example: ray job submit --address http://island-0:8265 --working-dir . -- "
                                       "python -m archipelago.orchestration.islands --shard 0 --config "
                                       "configs/digits-quickstart.yaml --data s3://b/run/data --out "
                                       "s3://b/run/experts/expert-0")
    p.add_argument("--config", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        import ray

        cfg = load_config(args.config, args.overrides)
        manifest = load_manifest(args.data)
        plan = next(pl for pl in resolve_islands(cfg, manifest, data_url=args.data) if pl.shard == args.shard)
        # On its own cluster the island runs locally there: drop the address that pointed here.
        plan = IslandPlan(**{**asdict(plan), "address": None, "out_url": args.out})
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto")
        root = args.out.rsplit("/experts/", 1)[0] if "/experts/" in args.out else args.out
        res = run_island(plan, cfg, root, cfg.islands.max_failures)
    except ArchipelagoError as exc:
        print(f"error: {storage.redact(str(exc))}", file=sys.stderr)
        return 2
    if not res.ok:
        print(f"error: {res.error}", file=sys.stderr)
        return 1
    print(f"done: {plan.name} steps={res.steps} final={res.final_checkpoint}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
