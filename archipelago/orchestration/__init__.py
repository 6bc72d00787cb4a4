"""Training at cluster scale: each expert on its own island (a Ray Train job), the router beside them, the
pipeline that turns a config into an ensemble, and MLflow tracking of all of it.

Submodules: islands (one TorchTrainer per shard, fault isolation, per-island job submission), router_job,
pipeline (`archipelago train`), tracking (MLflow runs, metrics callback, model registry)."""
from archipelago.orchestration.islands import IslandResult, completed_expert, run_island, run_islands
from archipelago.orchestration.pipeline import IslandsFailed, PipelineResult, run_pipeline

__all__ = ["IslandResult", "IslandsFailed", "PipelineResult", "completed_expert", "run_island", "run_islands",
           "run_pipeline"]
