"""The router's job beside the islands: one Ray task (it needs no expert, only the data), logging its
per-step metrics to its own nested MLflow run. Ray retries the task if its worker process dies; the router
is small, so a retry trains it again from the start (`train_router` reuses a finished identical router)."""
from __future__ import annotations

import math
import os
from typing import Any

from archipelago.cluster.spec import RouterPlan
from archipelago.config import ArchipelagoConfig


def router_task(config: dict[str, Any], data_url: str, out_url: str, tracking: dict[str, str] | None,
                threads: int = 1) -> dict[str, Any]:
    """Body of the Ray task: train (or reuse) the router; returns train_router's result (JSON-safe)."""
    os.environ.pop("MLFLOW_RUN_ID", None)
    import logging

    import torch

    from archipelago.orchestration.tracking import MlflowMetricsCallback
    from archipelago.router.train import train_router

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, threads))
    cfg = ArchipelagoConfig.model_validate(config)
    callbacks = [MlflowMetricsCallback(**tracking)] if tracking else []
    # a retry on another node waits out the lease of the attempt that died there
    return _json_safe(train_router(cfg, data_url, out_url, callbacks=callbacks,
                                   lease_wait_s=1.5 * cfg.expert.lease_ttl_s))


def start_router(plan: RouterPlan, cfg: ArchipelagoConfig, max_retries: int,
                 tracking: dict[str, str] | None = None) -> Any:
    """Submit the router task (non-blocking); returns its ObjectRef."""
    import ray

    task = ray.remote(router_task).options(
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_retries=max_retries, retry_exceptions=False,
        name="archipelago-router")
    return task.remote(cfg.model_dump(mode="json"), plan.data_url, plan.out_url, tracking,
                       max(1, int(plan.num_cpus)))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
