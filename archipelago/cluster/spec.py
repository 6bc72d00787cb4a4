"""Where and how each island runs: the config's `islands` section plus the data manifest resolved into one
validated `IslandPlan` per shard, so a bad override fails before any worker starts, with the field named.

    cfg.islands (defaults)  +  cfg.islands.per_island[k] (overrides)  +  manifest (K, shard sha256, counts)
        -> ClusterSpec(islands=[IslandPlan(shard=0, ...), ..., IslandPlan(shard=K-1, ...)], router=RouterPlan)

An island runs either on the driver's Ray cluster (`mode="ray"`: a Ray Train TorchTrainer started from the
driver) or as a job on a Ray cluster of its own (`mode="job"`: its address is a dashboard URL
http://host:8265, and the job is submitted with JobSubmissionClient).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from archipelago import storage
from archipelago.config import ArchipelagoConfig, island_expert_config
from archipelago.errors import ConfigError

if TYPE_CHECKING:
    from archipelago.data.shards import ShardManifest

IslandMode = Literal["ray", "job"]

# Fields of `expert` that change the trained weights. The rest (strategy, checkpoint cadence, logging,
# sampling) may change between runs without making a finished expert stale.
TRAINING_FIELDS_EXCLUDED = frozenset({"strategy", "zero_stage", "checkpoint_every", "keep_checkpoints",
                                      "log_every", "sampler", "sample_steps", "cfg_scale",
                                      "preempt_grace_s", "lease_ttl_s"})


def is_job_address(address: str | None) -> bool:
    """A Ray dashboard / job-submission URL (http://host:8265), as opposed to a GCS or ray:// address."""
    return bool(address) and bool(re.match(r"^https?://", address or ""))


def check_site_address(address: str, where: str) -> None:
    """ConfigError (one line naming the field) unless `address` is a usable dashboard URL http(s)://host[:port]."""
    from urllib.parse import urlsplit

    shown = redact_address(address)
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"field '{where}': {shown!r} is not a dashboard URL ({exc}); use http://host:8265") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"field '{where}': {shown!r} is not a dashboard URL; use http://host:8265 (the site's "
                          f"Ray job-submission address)")
    if port == 0 or (parts.path not in ("", "/")):
        raise ConfigError(f"field '{where}': {shown!r} has {'port 0' if port == 0 else 'a path'}; use "
                          f"http://host:8265 (the site's Ray job-submission address)")


def job_sites(cfg: ArchipelagoConfig, plans: list[IslandPlan]) -> list[str]:
    """Every site a job-mode island may run on, in order: the islands' own addresses, then islands.sites."""
    out: list[str] = []
    for address in [p.address for p in plans if p.mode == "job"] + list(cfg.islands.sites):
        if address and address.rstrip("/") not in [a.rstrip("/") for a in out]:
            out.append(address)
    return out


def redact_address(address: str | None) -> str | None:
    """An address without any user:password@ part (safe for logs, MLflow params, errors)."""
    if not address:
        return address
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1***@", address)


@dataclass(frozen=True)
class IslandPlan:
    """Everything needed to start island `shard`: the resolved resources, strategy and URLs."""
    shard: int                      # k: shard id = expert id
    name: str                       # island-{k}: Ray Train run name (unique within a run root, stable)
    num_workers: int                # Ray Train workers (= torch.distributed ranks)
    cpus_per_worker: float
    gpus_per_worker: float
    strategy: str                   # single | ddp | fsdp2 | deepspeed
    address: str | None             # None: the driver's Ray cluster; http://...: a cluster of its own
    resources: dict[str, float] = field(default_factory=dict)       # extra Ray resources per worker
    label_selector: dict[str, str] = field(default_factory=dict)    # Ray node labels the workers need
    data_url: str = ""              # prepared data (manifest + shards)
    out_url: str = ""               # <root>/experts/expert-{k}
    shard_sha256: str = ""
    shard_count: int = 0

    @property
    def mode(self) -> IslandMode:
        return "job" if is_job_address(self.address) else "ray"

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def backend(self) -> str:
        """torch.distributed backend of the island: NCCL on GPU, gloo on CPU."""
        return "nccl" if self.use_gpu else "gloo"

    @property
    def resources_per_worker(self) -> dict[str, float]:
        out = {"CPU": self.cpus_per_worker, **self.resources}
        if self.gpus_per_worker:
            out["GPU"] = self.gpus_per_worker
        return out

    @property
    def demand(self) -> dict[str, float]:
        """Resources the island holds while it trains (all workers at once)."""
        return {k: v * self.num_workers for k, v in self.resources_per_worker.items()}

    def island_config(self, cfg: ArchipelagoConfig) -> ArchipelagoConfig:
        """The config this island trains with: `cfg` with expert.strategy set to the island's strategy."""
        if cfg.expert.strategy == self.strategy:
            return cfg
        out = cfg.model_copy(deep=True)
        out.expert.strategy = self.strategy  # type: ignore[assignment]
        return out

    def params(self) -> dict[str, Any]:
        """Flat, secret-free description (MLflow params, summaries)."""
        return {"shard": self.shard, "name": self.name, "mode": self.mode, "num_workers": self.num_workers,
                "cpus_per_worker": self.cpus_per_worker, "gpus_per_worker": self.gpus_per_worker,
                "strategy": self.strategy, "backend": self.backend, "address": redact_address(self.address),
                "resources": dict(self.resources), "label_selector": dict(self.label_selector)}


@dataclass(frozen=True)
class RouterPlan:
    """The router job: one Ray task next to the islands, with one island worker's default resources."""
    num_cpus: float
    num_gpus: float
    data_url: str
    out_url: str                    # <root>/router

    @property
    def demand(self) -> dict[str, float]:
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {})}


@dataclass(frozen=True)
class ClusterSpec:
    """The resolved placement of a whole run: K islands, the router, and how many islands run at once."""
    islands: list[IslandPlan]
    router: RouterPlan
    address: str | None             # the driver's Ray address (None: RAY_ADDRESS or a local ray.init())
    max_concurrent: int
    max_failures: int

    @classmethod
    def from_config(cls, cfg: ArchipelagoConfig, manifest: ShardManifest, data_url: str | None = None,
                    root: str | None = None) -> ClusterSpec:
        root = root or cfg.storage.root
        data_url = data_url or storage.join(root, "data")
        isl = cfg.islands
        return cls(islands=resolve_islands(cfg, manifest, data_url=data_url, root=root),
                   router=RouterPlan(num_cpus=isl.cpus_per_worker, num_gpus=min(isl.gpus_per_worker, 1.0),
                                     data_url=data_url, out_url=storage.join(root, "router")),
                   address=None if is_job_address(isl.address) else isl.address,
                   max_concurrent=isl.max_concurrent, max_failures=isl.max_failures)


def resolve_islands(cfg: ArchipelagoConfig, manifest: ShardManifest, data_url: str | None = None,
                    root: str | None = None) -> list[IslandPlan]:
    """One validated IslandPlan per shard of `manifest` (per_island[k] over the islands defaults).

    Raises ConfigError naming `islands.per_island.<k>.<field>` for an override of a shard that does not
    exist, a strategy that cannot use the worker count, a batch that does not split over the workers, a
    shard with fewer samples than workers, or a second Ray (non-job) address next to the driver's.
    """
    isl = cfg.islands
    root = root or cfg.storage.root
    data_url = data_url or storage.join(root, "data")
    k_total = manifest.num_clusters
    unknown = sorted(k for k in isl.per_island if not 0 <= k < k_total)
    if unknown:
        raise ConfigError(f"field 'islands.per_island.{unknown[0]}': there is no shard {unknown[0]} (the data has "
                          f"K={k_total} shards, ids 0..{k_total - 1}); fix the key or data.num_clusters")
    default_ray_address = None if is_job_address(isl.address) else isl.address
    plans = []
    for k in range(k_total):
        spec = isl.per_island.get(k)
        where = f"islands.per_island.{k}" if spec is not None else "islands"

        def pick(name: str, default: Any, spec: Any = spec) -> Any:
            value = getattr(spec, name, None) if spec is not None else None
            return default if value is None else value

        num_workers = int(pick("num_workers", isl.num_workers))
        strategy = pick("strategy", cfg.expert.strategy)
        address = pick("address", isl.address)
        plan = IslandPlan(
            shard=k, name=f"island-{k}", num_workers=num_workers,
            cpus_per_worker=float(pick("cpus_per_worker", isl.cpus_per_worker)),
            gpus_per_worker=float(pick("gpus_per_worker", isl.gpus_per_worker)),
            strategy=strategy, address=address,
            resources=dict(getattr(spec, "resources", None) or {}),
            # Node labels: `labels` on IslandSpec when the config grows it (Ray >= 2.49 label selectors).
            label_selector=dict(getattr(spec, "labels", None) or {}),
            data_url=data_url, out_url=storage.join(root, "experts", f"expert-{k}"),
            shard_sha256=manifest.shards[k].sha256, shard_count=manifest.shards[k].count)
        _validate(plan, cfg, where, default_ray_address)
        plans.append(plan)
    for i, site in enumerate(isl.sites):
        check_site_address(site, f"islands.sites.{i}")
    if isl.on_site_loss == "resubmit" and any(p.mode == "job" for p in plans) and len(job_sites(cfg, plans)) < 2:
        raise ConfigError("field 'islands.on_site_loss': resubmit needs a second site to move a lost island to, "
                          "but every island uses the same one; add a dashboard URL to islands.sites or use fail")
    return plans


def _validate(plan: IslandPlan, cfg: ArchipelagoConfig, where: str, default_ray_address: str | None) -> None:
    ecfg = island_expert_config(cfg, cfg.data.num_clusters)   # the island's share (islands.flop_match)
    if plan.strategy == "single" and plan.num_workers > 1:
        raise ConfigError(f"field '{where}.strategy': 'single' cannot use num_workers={plan.num_workers} "
                          f"(island {plan.shard}); choose ddp, fsdp2 or deepspeed, or one worker")
    per = plan.num_workers * ecfg.grad_accum
    if ecfg.batch_size % per:
        raise ConfigError(f"field '{where}.num_workers': expert.batch_size={ecfg.batch_size} does not split over "
                          f"{plan.num_workers} workers x grad_accum {ecfg.grad_accum} (island {plan.shard}); "
                          f"use a batch size that is a multiple of {per}")
    if plan.shard_count < plan.num_workers:
        raise ConfigError(f"field '{where}.num_workers': shard {plan.shard} has {plan.shard_count} samples, "
                          f"fewer than its {plan.num_workers} workers")
    if plan.gpus_per_worker > 1 and plan.gpus_per_worker != int(plan.gpus_per_worker):
        raise ConfigError(f"field '{where}.gpus_per_worker': {plan.gpus_per_worker} GPUs per worker; use a "
                          f"fraction <= 1 or a whole number")
    if plan.mode == "job":
        check_site_address(plan.address or "", f"{where}.address" if where != "islands" else "islands.address")
    if plan.address and not is_job_address(plan.address) and plan.address != default_ray_address:
        raise ConfigError(f"field '{where}.address': {redact_address(plan.address)!r} is a Ray cluster address "
                          f"other than the driver's ({redact_address(default_ray_address)!r}); one driver connects "
                          f"to one Ray cluster, so give the island's own cluster as its job-submission URL, "
                          f"e.g. http://host:8265")
    for name, value in plan.resources.items():
        if value < 0 or name in ("CPU", "GPU"):
            raise ConfigError(f"field '{where}.resources.{name}': custom resources must be non-negative and not "
                              f"CPU/GPU (use cpus_per_worker / gpus_per_worker)")
