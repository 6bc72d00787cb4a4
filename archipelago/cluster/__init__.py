"""Where islands run: the config's `islands` section resolved into one plan per shard (`spec`), and a local
Ray head for laptops (`local`, behind `archipelago cluster up|status|down`)."""
from archipelago.cluster.spec import (
    ClusterSpec,
    IslandPlan,
    RouterPlan,
    is_job_address,
    redact_address,
    resolve_islands,
)

__all__ = ["ClusterSpec", "IslandPlan", "RouterPlan", "is_job_address", "redact_address", "resolve_islands"]
