"""Every YAML section as a pydantic model, and the one loader that turns bad input into one clear line.

Precedence is CLI (`--set a.b=v`) > file > defaults; every default works on a laptop (2 CPUs, no GPU).
"""
from __future__ import annotations

import enum
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from archipelago.errors import ConfigError

Strategy = Literal["single", "ddp", "fsdp2", "deepspeed"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them instead of silently ignoring.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VaeConfig(_Section):
    """A diffusers AutoencoderKL: experts then learn latents, and generate decodes with the same VAE."""
    path: str = Field(description="Local directory of a diffusers AutoencoderKL (config.json + "
                      "diffusion_pytorch_model.safetensors), or a hub id when allow_download is true.")
    subfolder: str | None = Field(None, description="Subfolder holding the VAE, e.g. 'vae' in a pipeline dir.")
    allow_download: bool = Field(False, description="Allow fetching `path` from the Hugging Face hub; off: "
                                 "nothing is ever downloaded.")
    batch_size: int = Field(32, ge=1, description="Images per VAE forward pass.")


class DataConfig(_Section):
    source: Literal["digits", "image_folder", "moving_digits", "webdataset"] = Field(
        "digits", description="Where samples come from: embedded sklearn digits, an fsspec image folder, "
        "the procedural moving-digits video source, or WebDataset tar shards (read as streams).")
    path: str | None = Field(None, description="fsspec URL/glob of the image folder (source=image_folder) or of "
                             "the .tar files (source=webdataset).")
    image_size: int = Field(16, ge=8, le=256, description="Side of the square images after resizing.")
    num_clusters: int = Field(4, ge=1, le=256, description="K: number of shards = number of experts.")
    partitioner: Literal["kmeans", "random"] = Field(
        "kmeans", description="kmeans over embeddings (the DDM method) or random (ablation).")
    embedder: Literal["pixel_pca", "classifier", "dinov2", "clip", "siglip"] = Field(
        "pixel_pca", description="Feature space for clustering: pixel_pca (offline, no labels), classifier "
        "(penultimate features of a small CNN fitted to the labels of the training split: our semantic "
        "stand-in for DINOv2 on labelled data), dinov2 / clip / siglip (only when their weights are local).")
    embed_dim: int = Field(32, ge=2, le=1024, description="Embedding dimension of the pixel_pca embedder.")
    max_imbalance: float = Field(
        2.0, ge=1.0, description="Upper bound on largest/smallest shard size; sizes are rebalanced to it.")
    seed: int = Field(0, description="Seed for embedding, k-means and random sharding.")
    holdout_fraction: float = Field(
        0.1, ge=0.0, lt=0.9, description="Fraction of the source (seeded by data.seed) written to holdout."
        "safetensors and never to a shard: no expert, router or monolith trains on it; eval scores against "
        "it. 0 disables it (eval then falls back to the training shards).")
    video_frames: int = Field(16, ge=2, description="Frames per clip (moving_digits).")
    video_size: int = Field(32, ge=16, description="Canvas side of the moving digits (moving_digits).")
    num_videos: int = Field(512, ge=1, description="Number of clips to generate (moving_digits).")
    dinov2_weights: str | None = Field(
        None, description="Local path to DINOv2 weights; never downloaded.")
    # --- at scale (issue 15): latents, pretrained embedders, chunked shards, lazy sources ---
    vae: VaeConfig | None = Field(
        None, description="Encode images to VAE latents during prepare (experts train on latents; generate "
        "decodes). None: train on pixels.")
    embedder_weights: str | None = Field(
        None, description="Local directory of a transformers CLIP/SigLIP vision model (save_pretrained "
        "layout) for embedder=clip|siglip; never downloaded.")
    embed_batch_size: int = Field(64, ge=1, description="Images per forward pass of a pretrained embedder.")
    shard_format: Literal["single", "chunked"] = Field(
        "single", description="single: one safetensors file per shard, loaded whole (small data). chunked: "
        "each shard is a list of bounded chunk files that training streams (large data).")
    chunk_mb: float = Field(256.0, gt=0, le=4096, description="Upper bound on one chunk file (MiB), chunked.")
    prepare_batch: int = Field(
        512, ge=1, description="Images decoded/encoded/embedded per step of the streamed preparation; also "
        "its unit of resumption (one staged part).")
    prepare_workers: int = Field(
        1, ge=1, le=256, description="Streamed preparation of an image folder: Ray actors building staged parts "
        "in parallel (each loads the VAE/embedder once); 1: in this process, no Ray.")
    on_bad_image: Literal["skip", "fail"] = Field(
        "fail", description="A corrupt/unreadable image: fail (one line naming the file) or skip (counted in "
        "the manifest). skip uses the streamed preparation.")
    kmeans_fit_samples: int = Field(
        20_000, ge=1, description="Streamed preparation: MiniBatchKMeans (and the pixel_pca fit) learn from the "
        "first this-many embeddings, a sample that does not grow with the data (faiss uses 256 per centroid); "
        "assignment is a second pass over all of them.")
    # --- reading side: how training loads shards (not part of the prepared data's identity) ---
    loader: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: load the shard whole; stream: read chunks through a shuffle buffer "
        "(chunked shards only); auto: stream chunked shards, load single-file shards.")
    shuffle_buffer: int = Field(4096, ge=1, description="Samples held by the streaming shuffle buffer.")


class ExpertConfig(_Section):
    # --- model (a DiT; see experts/dit.py) ---
    size: str | None = Field(None, description="Named size from the DiT registry (overrides the dims below).")
    patch_size: int = Field(2, ge=1, description="Side of a latent patch (token).")
    hidden_size: int = Field(64, ge=8, description="Token width.")
    depth: int = Field(4, ge=1, description="Number of DiT blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads; must divide hidden_size.")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / token width.")
    class_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Label dropout prob. (trains the CFG null class).")
    # --- training ---
    strategy: Strategy = Field("single", description="single | ddp | fsdp2 | deepspeed (ZeRO).")
    zero_stage: int = Field(2, ge=1, le=3, description="DeepSpeed ZeRO stage (strategy=deepspeed).")
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Global batch size per optimizer step (all ranks, all micro-steps).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(20, ge=0, description="Linear LR warm-up, then cosine decay to lr_min.")
    lr_min_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of lr.")
    grad_clip: float = Field(1.0, ge=0, description="Max grad norm (0 disables clipping).")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the weights used for sampling.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32 | bf16: bf16 autocast of forward and loss in every strategy (FSDP2 also "
        "all-gathers bf16 weights); weights, optimizer state and EMA stay fp32. A GPU without bf16 is an error.")
    compile: bool = Field(False, description="torch.compile the expert (training; and sampling in `generate`). "
                          "Slow first steps; on CPU it needs a C compiler.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between periodic checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Periodic checkpoints kept (the final one always is).")
    log_every: int = Field(10, ge=1, description="Steps between metric reports.")
    seed: int = Field(0, description="Global seed; rank r uses seed * world_size + r.")
    # --- reliability ---
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A non-finite loss or grad norm: stop the island (no final checkpoint) or skip "
                            "that optimizer step (at most max_nonfinite_skips times, then stop).")
    max_nonfinite_skips: int = Field(10, ge=0, description="Skipped non-finite steps tolerated per run "
                                                           "(on_nonfinite=skip).")
    preempt_grace_s: float = Field(25.0, gt=0, description="After SIGTERM (preemption): finish the step, "
                                   "checkpoint and exit within this many seconds.")
    lease_ttl_s: float = Field(60.0, ge=2, description="The run-directory lease expires this long after its "
                               "last heartbeat (renewed every ttl/3); then another attempt may take over.")
    # --- sampling ---
    sampler: Literal["euler", "heun"] = Field("euler", description="ODE solver for sampling.")
    sample_steps: int = Field(32, ge=1, description="Sampler steps.")
    cfg_scale: float = Field(2.0, ge=0, description="Classifier-free guidance scale (1 = no guidance).")

    @model_validator(mode="after")
    def _heads_divide(self) -> ExpertConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of 4 (2D sin-cos positions)")
        return self


class RouterConfig(_Section):
    class_conditional: bool = Field(
        True, description="r(x_t, t, y) as in the DDM paper (true) or r(x_t, t) (false: the ablation that "
        "lets top-1 reach every shard holding a class, when clusters split classes).")
    hidden_size: int = Field(64, ge=8, description="Channel width of the router CNN.")
    depth: int = Field(3, ge=1, description="Residual blocks of the router.")
    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(128, ge=1, description="Batch size.")
    lr: float = Field(1e-3, gt=0, description="Learning rate (AdamW).")
    t_bins: int = Field(5, ge=1, description="Bins of t used to report accuracy/calibration.")
    seed: int = Field(0, description="Seed.")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A non-finite loss or grad norm: stop (no router written) or skip that step "
                            "(at most max_nonfinite_skips times, then stop).")
    max_nonfinite_skips: int = Field(10, ge=0, description="Skipped non-finite steps tolerated (skip).")


class IslandSpec(_Section):
    """How one island (the workers that train one expert) runs; fields left None inherit from `islands`."""
    num_workers: int | None = Field(None, ge=1, description="Workers in this island.")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs per worker.")
    gpus_per_worker: float | None = Field(None, ge=0, description="GPUs per worker.")
    strategy: Strategy | None = Field(None, description="Overrides expert.strategy for this island.")
    address: str | None = Field(None, description="Ray address of this island's own cluster (None: the default).")
    resources: dict[str, float] = Field(default_factory=dict, description="Extra Ray resources, e.g. node_1: 1.")


FlopMatch = Literal["batch", "steps", "none"]
SiteLossPolicy = Literal["fail", "resubmit"]


class IslandsConfig(_Section):
    flop_match: FlopMatch = Field(
        "batch", description="How the budget in expert.steps x expert.batch_size (what one monolithic model "
        "would train with) is split over the K islands. batch: every island runs expert.steps steps at "
        "batch_size / K (the DDM paper's protocol); steps: every island runs steps / K steps at batch_size; "
        "none: every island gets the whole budget (K x the monolith's FLOPs).")
    num_workers: int = Field(1, ge=1, description="Default workers per island.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Default CPUs per worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="Default GPUs per worker.")
    max_failures: int = Field(1, ge=0, description="Ray Train FailureConfig.max_failures per island.")
    max_concurrent: int = Field(2, ge=1, description="Islands training at the same time.")
    address: str | None = Field(None, description="Default Ray address (None: local ray.init()).")
    per_island: dict[int, IslandSpec] = Field(
        default_factory=dict, description="Overrides keyed by shard id.")
    on_site_loss: SiteLossPolicy = Field(
        "fail", description="What a job-mode island does when its whole site (its Ray cluster's dashboard) "
        "stops answering for site_loss_timeout_s. fail (default): the island fails alone, the others finish, "
        "and re-running `archipelago train` with its address changed resumes it from its last checkpoint -- "
        "nothing moves without a person deciding where the extra load goes. resubmit: it is submitted to a "
        "surviving site (the other islands' addresses, then `sites`), which resumes it from its last "
        "checkpoint in the shared store.")
    sites: list[str] = Field(
        default_factory=list, description="More sites (dashboard URLs, http://host:8265) that on_site_loss="
        "resubmit may move a lost island to, besides the sites the islands already use.")
    site_loss_timeout_s: float = Field(
        30.0, gt=0, description="A site whose dashboard has not answered for this long is lost (job mode).")


class Mode(str, enum.Enum):
    """How one sampling run is spread over ranks (archipelago.inference.config.ParallelConfig)."""

    single = "single"                    # one rank, the plain model
    naive_patch = "naive_patch"          # row patches, no exchange at all: fast, visible seams
    sync_patch = "sync_patch"            # row patches, full K/V all-gathered in every attention: exact
    distrifusion = "distrifusion"        # row patches, stale remote K/V exchanged asynchronously (displaced)
    cfg_parallel = "cfg_parallel"        # conditional / unconditional branch on different rank groups
    expert_parallel = "expert_parallel"  # ensemble experts on different ranks, routed velocities all-reduced
    ulysses = "ulysses"                  # tokens split, all-to-all to split heads in every attention: exact
    ring = "ring"                        # tokens split, K/V passed round a ring, online softmax: exact
    usp = "usp"                          # ulysses_degree x ring_degree (unified sequence parallel): exact
    pipefusion = "pipefusion"            # layer stages x image patches, stale K/V of the other patches


class InferenceConfig(_Section):
    """Sampling settings of `archipelago generate` and of the pipeline's grid; generate's flags override them
    like `--set` does (the sampler, its steps and the guidance scale live in `expert`)."""
    mode: Mode = Field(Mode.single, description="Parallel mode of `generate` (single: one process).")
    world_size: int = Field(2, ge=1, description="Ranks of a parallel mode (ignored by single).")
    launcher: Literal["torchrun", "ray", "local"] = Field("torchrun", description="How the ranks start.")
    warmup_steps: int = Field(1, ge=0, description="Synchronous steps before DistriFusion goes stale.")
    patch_mode: Literal["naive_patch", "sync_patch", "distrifusion"] = Field(
        "sync_patch", description="Patch scheme inside cfg_parallel.")
    comm_group_layers: int = Field(1, ge=1, description="DistriFusion: layers per async K/V exchange.")
    cfg_degree: int | None = Field(None, ge=1, le=2, description="ulysses | ring | usp | pipefusion: 2 puts the "
                                   "CFG branches on separate rank groups (default 1; cfg_parallel: always 2).")
    ulysses_degree: int | None = Field(None, ge=1, description="ulysses | usp: ranks splitting the heads "
                                       "(default: inferred from world_size).")
    ring_degree: int | None = Field(None, ge=1, description="ring | usp: ranks passing K/V round a ring "
                                    "(default: inferred from world_size).")
    pipe_patches: int | None = Field(None, ge=1, description="PipeFusion: patches per image flowing through the "
                                     "stages (default: the number of stages).")
    routing: str = Field("top-1", pattern=r"^(full|top-\d+|sample-once)$",
                         description="Ensemble routing: full | top-k | sample-once (k ~ p(k|y) once per sample).")
    num_samples: int = Field(64, ge=1, description="Samples per grid.")
    seed: int = Field(0, description="Noise seed.")


class ServeConfig(_Section):
    """`archipelago serve`: the Ray Serve application of an ensemble. Laptop defaults: loopback only, one
    replica per expert, no token (set `token_env` and export that variable to require one)."""
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds (0.0.0.0 only behind auth/ingress).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy.")
    token_env: str | None = Field("ARCHIPELAGO_SERVE_TOKEN", description="Environment variable holding the "
                                  "bearer token; unset or empty variable: no token is required.")
    max_n: int = Field(64, ge=1, description="Largest n (samples) one request may ask for.")
    max_steps: int = Field(256, ge=1, description="Largest sampler step count one request may ask for.")
    max_body_bytes: int = Field(65536, ge=256, description="Largest request body; larger ones get 413.")
    batch_max_size: int = Field(8, ge=1, description="serve.batch: most expert/router calls merged into one.")
    batch_wait_s: float = Field(0.005, ge=0, description="serve.batch: how long a call waits for company.")
    exact: bool = Field(True, description="Batched calls run one forward per request inside the batch, so a "
                        "response equals `archipelago generate` bit for bit (CPU matmuls are not batch-"
                        "invariant at small batch sizes); false: one forward over the whole batch (faster, "
                        "samples differ from generate by float rounding).")
    expert_replicas: int = Field(1, ge=1, description="Replicas per expert deployment.")
    router_replicas: int = Field(1, ge=1, description="Replicas of the router deployment.")
    max_replicas: int | None = Field(None, ge=1, description="Autoscale each expert between expert_replicas "
                                     "and this (None: fixed expert_replicas).")
    replica_cpus: float = Field(0.0, ge=0, description="Ray CPUs each model replica reserves (0: no "
                                "reservation, a laptop shares its cores).")
    max_concurrent: int = Field(64, ge=1, description="Requests the ingress samples at once; more wait.")
    request_timeout_s: float = Field(120.0, gt=0, description="A request still sampling after this gets 503.")
    call_timeout_s: float = Field(30.0, gt=0, description="One expert/router call; a dead or stuck replica "
                                  "is retried on another until request_timeout_s, then 503.")


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="Log params/metrics/artifacts to MLflow.")
    tracking_uri: str | None = Field(
        None, description="MLflow URI; None: $MLFLOW_TRACKING_URI or sqlite:///<storage.root>/mlruns.db.")
    experiment: str = Field("archipelago", description="MLflow experiment name.")


class StorageConfig(_Section):
    root: str = Field("runs/quickstart", description="fsspec URL under which every artifact is written.")


class ArchipelagoConfig(_Section):
    name: str = Field("digits-quickstart", description="Run name.")
    data: DataConfig = Field(default_factory=DataConfig)
    expert: ExpertConfig = Field(default_factory=ExpertConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    islands: IslandsConfig = Field(default_factory=IslandsConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the resolved config (stable across key order). `serve` is left
        out: how a model is served does not change what was trained (nor re-trains it)."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"serve"}), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def island_expert_config(cfg: ArchipelagoConfig, num_clusters: int) -> ExpertConfig:
    """The expert config one of `num_clusters` islands trains with, under `islands.flop_match`.

    expert.steps x expert.batch_size is the budget of one monolithic model; the DDM arms are FLOP-matched
    to it by splitting it over the K islands (K = 1 is the monolith and changes nothing):
      batch  same steps, batch_size / K per island (the DDM paper: its 16-expert arm underperforms because
             each expert's batch gets too small, which only happens this way);
      steps  same batch, steps / K per island; warm-up is cut and the EMA decay raised to the power K so
             its half-life stays the same fraction of the (K x shorter) run: otherwise a short run is
             sampled from weights still dominated by their zero-output initialisation;
      none   every island trains the whole budget (K x the monolith's FLOPs).
    A budget that does not split exactly is a ConfigError: FLOP matching is either exact or not claimed.
    """
    e, k, mode = cfg.expert, num_clusters, cfg.islands.flop_match
    if k <= 1 or mode == "none":
        return e
    if mode == "batch":
        if e.batch_size % k:
            raise ConfigError(f"field 'expert.batch_size': {e.batch_size} does not split over K={k} islands "
                              f"(islands.flop_match=batch gives each batch_size / K); use a multiple of {k}, or "
                              f"islands.flop_match=steps | none")
        return e.model_copy(update={"batch_size": e.batch_size // k})
    if e.steps % k:
        raise ConfigError(f"field 'expert.steps': {e.steps} does not split over K={k} islands "
                          f"(islands.flop_match=steps gives each steps / K); use a multiple of {k}, or "
                          f"islands.flop_match=batch | none")
    return e.model_copy(update={"steps": e.steps // k, "warmup_steps": e.warmup_steps // k,
                                "ema_decay": round(e.ema_decay ** k, 6),
                                "checkpoint_every": max(1, min(e.checkpoint_every, e.steps // k))})


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------

def _allowed(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """Describe what a field accepts (enum values or sub-fields), for the error line."""
    cls: Any = model
    ann: Any = None
    for part in loc:
        if isinstance(cls, type) and issubclass(cls, BaseModel) and part in cls.model_fields:
            ann = cls.model_fields[part].annotation
            cls = ann
        else:
            break
    else:
        if ann is None:
            return None
    for cand in (ann, *get_args(ann)):
        if get_origin(cand) is Literal:
            return " | ".join(map(str, get_args(cand)))
    return None


def _format_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"])
    field = ".".join(str(p) for p in loc) or "<root>"
    if e["type"] == "extra_forbidden":
        parent: Any = ArchipelagoConfig
        for part in loc[:-1]:
            f = parent.model_fields.get(part) if isinstance(parent, type) else None
            parent = f.annotation if f is not None else None
        known = ", ".join(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else ""
        return f"{source}: unknown field '{field}'" + (f" (known: {known})" if known else "")
    msg = e["msg"].removeprefix("Value error, ")
    allowed = _allowed(ArchipelagoConfig, loc)
    got = e.get("input")
    got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    hint = f"; allowed: {allowed}" if allowed and "Input should be" in msg else ""
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: field '{field}': {msg}{got_s}{hint}{more}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], yaml-typed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set expert.depth=6")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply dotted overrides; unknown keys are rejected later by validation (extra=forbid)."""
    for item in overrides or []:
        parts, value = parse_override(item)
        node = raw
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ArchipelagoConfig:
    """Load YAML (or defaults when path is None), apply `--set` overrides, validate.

    Raises ConfigError with one line: `<file>: field 'a.b': <problem>; allowed: ...`.
    """
    source = str(path) if path is not None else "<defaults>"
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found (see configs/ for examples)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f": line {mark.line + 1}" if mark is not None else ""
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())   # PyYAML's spans lines
            raise ConfigError(f"{source}{where}: not valid YAML ({problem})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections "
                              f"({', '.join(ArchipelagoConfig.model_fields)})")
    raw = apply_overrides(raw, overrides)
    if overrides:
        source += " + --set"
    try:
        return ArchipelagoConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def dump_config(cfg: ArchipelagoConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
