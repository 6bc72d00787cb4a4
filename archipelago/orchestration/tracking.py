"""MLflow for a training run: one parent run per pipeline, a nested run per island and one for the router,
per-step metrics logged from rank 0 inside the workers, artifacts and the ensemble's registry entry.

The driver owns the store: it creates the database, the experiment and every run (children carry the
`mlflow.parentRunId` tag) before any worker starts, so workers never race on sqlite migrations; a worker
only gets (tracking URI, run id) and appends metrics and tags to its run through `MlflowClient`, never
through `mlflow.start_run`, so a stray MLFLOW_RUN_ID in a worker's environment cannot redirect it. Every
store call retries on sqlite's "database is locked". Params are the resolved config only — never values
from the environment — and anything that looks like a credential is scrubbed first.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from archipelago import storage
from archipelago.config import ArchipelagoConfig
from archipelago.errors import ArchipelagoError
from archipelago.experts.callbacks import TrainCallback

log = logging.getLogger(__name__)

T = TypeVar("T")
STATE_FILE = "tracking.json"   # under the run root: the run ids a re-run of the same config reuses
_PARAMS_PER_CALL = 100          # MLflow log_batch limits
# Who set a run RUNNING: the driver process (host, pid, its start time), so that the next driver start on
# that host can end the runs of a driver that was killed (SIGKILL, OOM, a lost node) instead of leaving them
# RUNNING forever. Tags, not params: a re-run of the same config overwrites them.
OWNER_HOST, OWNER_PID, OWNER_START = "archipelago.owner_host", "archipelago.owner_pid", "archipelago.owner_start"
ENDED_BECAUSE, RESUMED_AFTER = "archipelago.ended_because", "archipelago.resumed_after"
_METRICS_PER_CALL = 1000
_MAX_PARAM_LEN = 500


class TrackingError(ArchipelagoError):
    """The MLflow store cannot be reached or written."""


# ----------------------------------------------------------------------------------------------------
# Helpers: the tracking URI, retries, secret-free params
# ----------------------------------------------------------------------------------------------------

def resolve_tracking_uri(cfg: ArchipelagoConfig, root: str | None = None) -> str:
    """tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlruns.db (an absolute path, so
    workers with another working directory open the same file); ./mlruns.db when the root is not local."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = root or cfg.storage.root
    if storage.is_local(root):
        return f"sqlite:///{(storage.local_path(root) / 'mlruns.db').resolve()}"
    log.warning("storage.root %s is not local: MLflow uses ./mlruns.db; set tracking.tracking_uri to a server "
                "the islands can reach", scrub(root))
    return f"sqlite:///{Path('mlruns.db').resolve()}"


def is_locked_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text


def with_retry(fn: Callable[..., T], *args: Any, attempts: int = 12, **kwargs: Any) -> T:
    """Call fn; on sqlite's "database is locked" back off (0.05 s doubling, jittered, ~1 min total) and retry."""
    delay = 0.05
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_locked_error(exc) or i == attempts - 1:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 8.0)
    raise AssertionError("unreachable")


_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")


def scrub(text: str) -> str:
    """Remove user:password@ from URLs and any credential value found in the environment."""
    return storage.redact(_USERINFO.sub(r"\1***@", text))


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists and empty dicts become JSON; values scrubbed and truncated."""
    out: dict[str, str] = {}
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    value = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True)
    out[prefix or "value"] = scrub(value)[:_MAX_PARAM_LEN]
    return out


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def log_metrics(client: Any, run_id: str, rows: Iterable[tuple[int, dict[str, float]]]) -> int:
    """Log (step, {name: value}) rows in batches; non-finite and non-numeric values are skipped."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key=k, value=float(v), timestamp=now, step=int(step))
               for step, values in rows for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    for i in range(0, len(metrics), _METRICS_PER_CALL):
        with_retry(client.log_batch, run_id, metrics=metrics[i:i + _METRICS_PER_CALL])
    return len(metrics)


# ----------------------------------------------------------------------------------------------------
# Worker side: a TrainCallback that logs from rank 0
# ----------------------------------------------------------------------------------------------------

def ray_node_ip() -> str | None:
    """IP address of the Ray node this process runs on; None outside a Ray worker."""
    try:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - tracking must never kill training
        return None


class MlflowMetricsCallback(TrainCallback):
    """Per-step metrics of one island (or the router) into its MLflow run, from rank 0 only.

    Metrics are buffered and written every `flush_every_s` seconds, at each checkpoint and at the end: a few
    store writes per run instead of one per step (sqlite has one writer at a time; islands share it).
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every_s: float = 10.0):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self.rank = 0
        self._rows: list[tuple[int, dict[str, float]]] = []
        self._last_flush = time.monotonic()
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:  # pickled to Ray workers: no live client
        return {**self.__dict__, "_client": None, "_rows": []}

    def _get(self) -> Any:
        if self._client is None:
            self._client = _client(self.tracking_uri)
        return self._client

    def on_start(self, info: dict[str, Any]) -> None:
        self.rank = int(info.get("rank", 0))
        if self.rank == 0:
            with_retry(self._get().set_tag, self.run_id, "archipelago.start_step", str(info.get("start_step", 0)))
            node_ip = ray_node_ip()
            if node_ip:  # where the job really ran: shows that pinning (islands.per_island.k.resources) held
                with_retry(self._get().set_tag, self.run_id, "archipelago.node_ip", node_ip)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        self._rows.append((step, dict(metrics)))
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def on_checkpoint(self, step: int, url: str) -> None:
        if self.rank == 0:
            self.flush()
            with_retry(self._get().set_tag, self.run_id, "archipelago.last_checkpoint", scrub(url))

    def on_end(self, result: dict[str, Any]) -> None:
        if self.rank == 0:
            self.flush()

    def flush(self) -> None:
        rows, self._rows = self._rows, []
        self._last_flush = time.monotonic()
        if rows:
            try:
                log_metrics(self._get(), self.run_id, rows)
            except Exception as exc:  # noqa: BLE001 - tracking must never kill training
                log.warning("MLflow: could not log %d metric rows to run %s: %s", len(rows), self.run_id,
                            scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__))


# ----------------------------------------------------------------------------------------------------
# Driver side: the runs of one pipeline
# ----------------------------------------------------------------------------------------------------

class Tracker:
    """The MLflow runs of one pipeline: the parent and its children, reused when the same config re-runs.

    `Tracker.open(cfg, root)` returns a NullTracker when tracking.enabled is false, so callers never branch.
    """

    enabled = True

    def __init__(self, uri: str, client: Any, experiment_id: str, parent_run_id: str, children: dict[str, str],
                 state_url: str, config_hash: str, reused: bool):
        self.uri = uri
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.children = children
        self.state_url = state_url
        self.config_hash = config_hash
        self.reused = reused

    # --- opening ---
    @classmethod
    def open(cls, cfg: ArchipelagoConfig, root: str) -> Tracker:
        """The runs of this pipeline (created, or reused for the same config); TrackingError (one line) when
        the store cannot be reached or written."""
        if not cfg.tracking.enabled:
            return NullTracker()
        uri = resolve_tracking_uri(cfg, root)
        try:
            return cls._open(cfg, root, uri)
        except ArchipelagoError:
            raise
        except Exception as exc:  # noqa: BLE001 - MlflowException, sqlalchemy, requests errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrackingError(f"MLflow at {scrub(uri)}: {scrub(first)[:300]}; fix tracking.tracking_uri / "
                                f"MLFLOW_TRACKING_URI or set tracking.enabled=false") from None

    @classmethod
    def _open(cls, cfg: ArchipelagoConfig, root: str, uri: str) -> Tracker:
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        client = _client(uri)
        # Creating the store (and running its migrations) happens here, once, before any worker starts.
        with_retry(client.search_experiments, max_results=1)
        exp_id = _experiment(client, cfg.tracking.experiment, uri, root)
        end_runs_of_dead_owners(client, exp_id)
        state_url = storage.join(root, STATE_FILE)
        config_hash = cfg.config_hash()
        state = storage.read_json(state_url) if storage.exists(state_url) else {}
        parent = state.get("parent_run_id") if state.get("config_hash") == config_hash else None
        if parent is not None and not _run_exists(client, parent, exp_id):
            parent = None
        children = dict(state.get("children", {})) if parent else {}
        reused = parent is not None
        if parent is None:
            run = with_retry(client.create_run, exp_id, run_name=cfg.name,
                             tags={"archipelago.kind": "pipeline", "archipelago.config_hash": config_hash,
                                   **_owner_tags()})
            parent = run.info.run_id
            params = flatten(cfg.model_dump(mode="json"))
            params["config_hash"] = config_hash
            _log_params(client, parent, params)
        else:
            _resume(client, parent)
        tracker = cls(uri, client, exp_id, parent, children, state_url, config_hash, reused)
        tracker._save_state()
        log.info("MLflow: %s parent run %s in experiment %r (%s)", "resumed" if reused else "started", parent,
                 cfg.tracking.experiment, scrub(uri))
        return tracker

    def _save_state(self) -> None:
        storage.write_json(self.state_url, {"config_hash": self.config_hash, "parent_run_id": self.parent_run_id,
                                            "experiment_id": self.experiment_id, "children": self.children})

    # --- children ---
    def child(self, key: str, run_name: str, params: dict[str, Any], tags: dict[str, Any]) -> str | None:
        """The nested run `key` (e.g. island-0, router): reused if this pipeline already made it."""
        run_id = self.children.get(key)
        if run_id is not None and _run_exists(self.client, run_id, self.experiment_id):
            _resume(self.client, run_id)
        else:
            all_tags = {"mlflow.parentRunId": self.parent_run_id, **{k: scrub(str(v)) for k, v in tags.items()},
                        **_owner_tags()}
            run = with_retry(self.client.create_run, self.experiment_id, run_name=run_name, tags=all_tags)
            run_id = run.info.run_id
            _log_params(self.client, run_id, flatten(params))
            self.children[key] = run_id
            self._save_state()
        return run_id

    def worker_tracking(self, run_id: str | None) -> dict[str, str] | None:
        """What a worker needs to log into `run_id` (MlflowMetricsCallback kwargs)."""
        return {"tracking_uri": self.uri, "run_id": run_id} if run_id else None

    # --- logging ---
    def set_tags(self, run_id: str | None, tags: dict[str, Any]) -> None:
        if run_id:
            from mlflow.entities import RunTag

            with_retry(self.client.log_batch, run_id,
                       tags=[RunTag(k, scrub(str(v))[:5000]) for k, v in tags.items() if v is not None])

    def log_metrics(self, run_id: str | None, metrics: dict[str, Any], step: int = 0) -> None:
        if run_id:
            log_metrics(self.client, run_id, [(step, metrics)])

    def log_metric_rows(self, run_id: str | None, rows: Iterable[tuple[int, dict[str, float]]]) -> int:
        return log_metrics(self.client, run_id, rows) if run_id else 0

    def log_artifact(self, run_id: str | None, url: str, artifact_path: str | None = None) -> None:
        """Copy one stored file (any storage URL) into the run's artifacts."""
        if not run_id or not storage.exists(url):
            return
        if storage.is_local(url):
            with_retry(self.client.log_artifact, run_id, str(storage.local_path(url)), artifact_path)
            return
        with tempfile.TemporaryDirectory(prefix="archipelago-artifact-") as tmp:
            local = Path(tmp) / url.rstrip("/").rsplit("/", 1)[-1]
            local.write_bytes(storage.read_bytes(url))
            with_retry(self.client.log_artifact, run_id, str(local), artifact_path)

    def end(self, run_id: str | None, ok: bool) -> None:
        if run_id:
            with_retry(self.client.set_terminated, run_id, "FINISHED" if ok else "FAILED")

    def close(self, ok: bool) -> None:
        self.end(self.parent_run_id, ok)

    # --- registry ---
    def register_ensemble(self, name: str, ensemble_url: str, extra_files: dict[str, str],
                          tags: dict[str, Any]) -> str | None:
        """Log the ensemble as an MLflow pyfunc model (archipelago.serve.mlflow_model: packaged weights +
        ensemble.json, extra_files beside MLmodel) under the parent run's `ensemble/` artifacts and register that
        directory as a version of model `name`, so `mlflow.pyfunc.load_model("models:/name/V")` samples and
        `mlflow models serve` serves it. The same ensemble (sha256) is registered once. Returns the version."""
        digest = storage.sha256_url(ensemble_url)
        existing = with_retry(self.client.search_model_versions,
                              f"name = '{name}' and run_id = '{self.parent_run_id}'")
        for mv in existing:
            if (mv.tags or {}).get("archipelago.ensemble_sha256") == digest:
                return str(mv.version)
        from mlflow.exceptions import MlflowException

        from archipelago.serve.mlflow_model import save_pyfunc

        with tempfile.TemporaryDirectory(prefix="archipelago-model-") as tmp:
            model_dir = save_pyfunc(ensemble_url, Path(tmp) / "ensemble", extra_files)
            with_retry(self.client.log_artifacts, self.parent_run_id, str(model_dir), "ensemble")

        try:
            with_retry(self.client.create_registered_model, name,
                       description="Archipelago ensemble (MLflow pyfunc): experts + router, ensemble.json, manifests")
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        run = with_retry(self.client.get_run, self.parent_run_id)
        mv = with_retry(self.client.create_model_version, name, source=f"{run.info.artifact_uri}/ensemble",
                        run_id=self.parent_run_id,
                        tags={"archipelago.ensemble_sha256": digest, **{k: scrub(str(v)) for k, v in tags.items()}},
                        description=f"ensemble.json sha256 {digest}")
        return str(mv.version)


class NullTracker(Tracker):
    """Tracking disabled: every call is a no-op and every run id is None."""

    enabled = False

    def __init__(self) -> None:
        self.uri, self.parent_run_id, self.children, self.reused = "", None, {}, False  # type: ignore[assignment]

    def child(self, key: str, run_name: str, params: dict[str, Any], tags: dict[str, Any]) -> None:
        return None

    def set_tags(self, run_id: str | None, tags: dict[str, Any]) -> None:
        pass

    def log_metrics(self, run_id: str | None, metrics: dict[str, Any], step: int = 0) -> None:
        pass

    def log_metric_rows(self, run_id: str | None, rows: Iterable[tuple[int, dict[str, float]]]) -> int:
        return 0

    def log_artifact(self, run_id: str | None, url: str, artifact_path: str | None = None) -> None:
        pass

    def end(self, run_id: str | None, ok: bool) -> None:
        pass

    def register_ensemble(self, name: str, ensemble_url: str, extra_files: dict[str, str],
                          tags: dict[str, Any]) -> None:
        return None


def _experiment(client: Any, name: str, uri: str, root: str) -> str:
    """The experiment's id, creating it with artifacts under <root>/mlartifacts for a local sqlite store."""
    from mlflow.exceptions import MlflowException

    exp = with_retry(client.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:") and storage.is_local(root):
        location = (storage.local_path(root) / "mlartifacts").resolve().as_uri()
    try:
        return with_retry(client.create_experiment, name, artifact_location=location)
    except MlflowException as exc:  # created by a concurrent pipeline in between
        exp = with_retry(client.get_experiment_by_name, name)
        if exp is None:
            raise MlflowException(scrub(str(exc))) from None
        return exp.experiment_id


def _start_ticks(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22): with the pid, it names
    one process even after the pid is reused. "" where /proc is not available."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_tags() -> dict[str, str]:
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid()), OWNER_START: _start_ticks(os.getpid())}


def _resume(client: Any, run_id: str) -> None:
    """Set a reused run RUNNING again under this driver. A run a dead driver's end was recorded on (KILLED by
    end_runs_of_dead_owners) keeps that as `archipelago.resumed_after` instead of `ended_because`."""
    from mlflow.entities import RunTag

    with_retry(client.update_run, run_id, status="RUNNING")
    tags = _owner_tags()
    why = with_retry(client.get_run, run_id).data.tags.get(ENDED_BECAUSE)
    if why:
        tags[RESUMED_AFTER] = why
        with_retry(client.delete_tag, run_id, ENDED_BECAUSE)
    with_retry(client.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _owner_gone(tags: dict[str, str]) -> str | None:
    """Why the driver that set this run RUNNING no longer exists ("host h pid p is gone"), or None when it
    may still be running (alive, on another host, or unknown: runs without owner tags are left alone)."""
    from archipelago.cluster.local import pid_alive

    host, pid = tags.get(OWNER_HOST), tags.get(OWNER_PID, "")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return None
    start = tags.get(OWNER_START, "")
    if pid_alive(int(pid)) and (not start or _start_ticks(int(pid)) in ("", start)):
        return None
    return f"driver pid {pid} on host {host} is gone"


def end_runs_of_dead_owners(client: Any, experiment_id: str) -> list[str]:
    """End as KILLED the experiment's RUNNING runs whose driver died without ending them (a killed
    `archipelago train`: its pipeline run and the island / router runs it had opened). Called when a driver
    starts; a run of a live driver, or of a driver on another host, is left as it is. Returns their ids."""
    from mlflow.entities import RunTag

    runs = with_retry(client.search_runs, [experiment_id], filter_string="attributes.status = 'RUNNING'",
                      max_results=1000)
    ended = []
    for run in runs:
        why = _owner_gone(run.data.tags)
        if why is None:
            continue
        with_retry(client.log_batch, run.info.run_id, tags=[RunTag(ENDED_BECAUSE, why)])
        with_retry(client.set_terminated, run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    if ended:
        log.warning("MLflow: %d run(s) left RUNNING by a driver that is gone marked KILLED (%s)", len(ended),
                    ", ".join(r[:8] for r in ended))
    return ended


def _run_exists(client: Any, run_id: str, experiment_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        run = with_retry(client.get_run, run_id)
    except MlflowException:
        return False
    return run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), _PARAMS_PER_CALL):
        with_retry(client.log_batch, run_id, params=items[i:i + _PARAMS_PER_CALL])


def read_metrics_jsonl(url: str) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) rows of an expert's metrics.jsonl (for islands that ran as jobs elsewhere)."""
    rows = []
    if not storage.exists(url):
        return rows
    for line in storage.read_text(url).splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            step = int(rec.pop("step"))
            rec.pop("time", None)
            rows.append((step, rec))
    return rows
