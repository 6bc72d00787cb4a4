"""The decentralized diffusion model at sampling time: K experts + a router behind one expert-shaped call.

`Ensemble.forward(x, t, y) -> v` has the experts' signature and a `num_classes` attribute, so every sampler
and parallel mode that drives one DiT drives an ensemble unchanged. Velocity modes (DDM, arXiv 2501.05450):
    full    v = sum_k r_k(x_t, t) v_k(x_t, t)                  (every expert on every sample)
    top-k   v = sum_{k in topk} r_k v_k / sum_{k in topk} r_k   (only the selected experts run)
    top-1   v = v_argmax                                       (one expert per sample and step)
    sample-once  k ~ p(k | y) drawn once per sample, v = v_k for the whole trajectory
Routing is decided per sample and per call from r(x_t, t[, y]), except in sample-once, which never asks
the router: with class-conditional experts the data distribution is the mixture sum_k p(k|y) p_k(x|y), and
p(k|y) is known exactly from the shards' class counts, so drawing one expert per sample and running it to
the end samples that mixture exactly at the cost of one expert (the DDM paper's "sample-1", an expert
re-drawn at every step, is a different and much worse thing). Draws come from `sample_seed` and the label
vector only, so every call of one sampling run (and every rank) makes the same choice per sample. Sparse modes gather the samples routed to
each expert and run it once on them, so a top-k step costs at most K expert calls on N*k samples in all.

CFG: `sampling.guided_velocity` evaluates one batch [x; x] with labels [y; null]. The ensemble recognises
that layout (identical x and t halves, null labels in the second half) and routes on the *conditional*
half only, reusing the same experts and weights for the unconditional half: v_c and v_u of one sample
then come from the same experts, so the guidance direction v_c - v_u is a difference within one mixture
instead of a difference between two different experts. Any other batch is routed sample by sample.

`ensemble.json` pins what belongs together: expert checkpoint URIs by shard id, the router URI, the data
manifest sha256 (and the shard sha256s it lists) and the config hash; `load_ensemble` refuses (one
EnsembleError line naming the expert or file) anything that does not match.
"""
from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from archipelago import storage
from archipelago.errors import CheckpointError, DataError, EnsembleError, StorageError

FORMAT_VERSION = 1
ENSEMBLE_FILE = "ensemble.json"
# Sampling defaults stored with each expert that must agree across experts to sample them together.
SAMPLER_FIELDS = ("sampler", "sample_steps", "cfg_scale")


SAMPLE_ONCE = "sample-once"


def parse_mode(mode: str) -> int | None:
    """'full' -> None, 'top-k' -> k (k >= 1), 'sample-once' -> 1; anything else raises EnsembleError."""
    if mode == "full":
        return None
    if mode == SAMPLE_ONCE:
        return 1
    m = re.fullmatch(r"top-(\d+)", mode)
    if m is None or int(m.group(1)) < 1:
        raise EnsembleError(f"unknown routing mode {mode!r}; allowed: full | top-1 | top-2 | ... | top-K | "
                            f"{SAMPLE_ONCE}")
    return int(m.group(1))


def class_prior(class_counts: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """p(k | y) as a [num_classes + 1, K] float64 table from per-shard class counts [K][C]; the last row
    (the null label) is the marginal p(k). A class no shard holds falls back to the marginal."""
    counts = torch.tensor(class_counts, dtype=torch.float64).T                   # [C, K]
    if counts.shape[0] != num_classes:
        raise EnsembleError(f"the data's class counts cover {counts.shape[0]} classes, the experts "
                            f"{num_classes}")
    marginal = counts.sum(0) / counts.sum()                                      # [K]
    rows = counts.sum(1, keepdim=True)                                           # [C, 1]
    prior = torch.where(rows > 0, counts / rows.clamp(min=1), marginal)          # [C, K]
    return torch.cat([prior, marginal[None]])                                    # [C + 1, K]


# ----------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------

class Ensemble(nn.Module):
    """K experts + router with the experts' call signature: forward(x, t, y) -> v.

    Counters (reset with `reset_counters()`): `expert_calls` (expert forward calls), `expert_samples[k]`
    (samples expert k has evaluated), `router_calls`, `router_samples`. With `record_routing = True`, each
    call appends the top-1 expert of every routed sample (CPU long [N]) to `routing_log`.
    """

    def __init__(self, experts: Sequence[nn.Module], router: nn.Module, mode: str = "top-1",
                 class_counts: Sequence[Sequence[int]] | None = None, sample_seed: int = 0):
        super().__init__()
        if len(experts) < 1:
            raise EnsembleError("an ensemble needs at least one expert")
        self.experts = nn.ModuleList(experts)
        self.router = router
        self.num_classes = int(experts[0].num_classes)
        for attr in ("in_channels", "input_size"):
            if hasattr(experts[0], attr):
                setattr(self, attr, getattr(experts[0], attr))
        k_router = getattr(router, "num_experts", None)
        if k_router is not None and int(k_router) != len(experts):
            raise EnsembleError(f"router predicts {k_router} clusters but the ensemble has {len(experts)} experts")
        # p(k | y) for sample-once routing (None: the data's class counts are unknown, the mode is refused)
        self.class_prior = None if class_counts is None else class_prior(class_counts, self.num_classes)
        self.sample_seed = sample_seed
        self.mode = mode
        self.record_routing = False
        self.routing_log: list[torch.Tensor] = []
        self.reset_counters()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        k = parse_mode(mode)
        if mode == SAMPLE_ONCE and getattr(self, "class_prior", None) is None:
            raise EnsembleError(f"routing mode {SAMPLE_ONCE} needs the shards' class counts, which this "
                                f"ensemble's data manifest lacks; re-run `archipelago data prepare` and train")
        if k is not None and k > len(self.experts):
            raise EnsembleError(f"routing mode {mode} needs at least {k} experts; this ensemble has "
                                f"{len(self.experts)}")
        self._mode, self.top_k = mode, k

    def reset_counters(self) -> None:
        self.expert_calls = 0
        self.expert_samples = [0] * len(self.experts)
        self.router_calls = 0
        self.router_samples = 0
        self.routing_log = []

    # --- routing ------------------------------------------------------------------------------------
    def _cfg_pairs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> bool:
        """True if the batch is guided_velocity's [cond; uncond] layout: same x and t, null labels second."""
        n = x.shape[0]
        if n % 2:
            return False
        h = n // 2
        return (bool((y[h:] == self.num_classes).all()) and bool((y[:h] != self.num_classes).any())
                and torch.equal(t[:h], t[h:]) and torch.equal(x[:h], x[h:]))

    def route(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mixture weights [N, K] (float32; rows sum to 1, zeros outside the selected experts)."""
        pairs = self._cfg_pairs(x, t, y)
        xs, ts, ys = (x[: x.shape[0] // 2], t[: t.shape[0] // 2], y[: y.shape[0] // 2]) if pairs else (x, t, y)
        if self._mode == SAMPLE_ONCE:
            probs = self._draw_once(ys).to(x.device)                              # [n, K] one-hot
        else:
            probs = self.router(xs, ts, ys).float().softmax(dim=-1)               # [n, K]
            self.router_calls += 1
            self.router_samples += xs.shape[0]
        if self.top_k is not None and self.top_k < probs.shape[1]:
            top_p, top_i = probs.topk(self.top_k, dim=-1)                         # [n, k] each
            weights = torch.zeros_like(probs).scatter_(1, top_i, top_p / top_p.sum(-1, keepdim=True))
        else:
            weights = probs
        if self.record_routing:
            self.routing_log.append(probs.argmax(dim=-1).cpu())
        return torch.cat([weights, weights]) if pairs else weights               # [N, K]

    def _draw_once(self, y: torch.Tensor) -> torch.Tensor:
        """One-hot [n, K]: expert k ~ p(k | y_i) per sample, from `sample_seed` and the labels alone (so the
        same labels get the same experts at every step of a trajectory)."""
        g = torch.Generator().manual_seed(self.sample_seed)
        p = self.class_prior[y.cpu().clamp(0, self.num_classes)]                  # [n, K]
        k = torch.multinomial(p, 1, generator=g).squeeze(1)                       # [n]
        return F.one_hot(k, len(self.experts)).float()                            # [n, K]

    # --- velocity -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [N,C,H,W], t float [N], y long [N] (num_classes = null) -> mixture velocity [N,C,H,W] (fp32)."""
        weights = self.route(x, t, y)                                             # [N, K]
        calls = self.expert_calls_for(weights)
        return self.combine(x, weights, calls, self.run_experts(x, t, y, calls))

    def expert_calls_for(self, weights: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        """(k, sample indices or None = all) for every expert with work, in k order."""
        calls = []
        for k in range(len(self.experts)):
            if self.top_k is None:
                calls.append((k, None))                                           # full: everyone
                continue
            idx = torch.nonzero(weights[:, k] > 0).squeeze(1)                     # [n_k]
            if idx.numel():
                calls.append((k, None if idx.numel() == weights.shape[0] else idx))
        return calls

    def run_experts(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                    calls: list[tuple[int, torch.Tensor | None]]) -> list[torch.Tensor]:
        """The experts' velocities for `calls`, one after another (a served ensemble overrides this to run
        them at once on their own replicas)."""
        return [self.experts[k](x, t, y) if idx is None else self.experts[k](x[idx], t[idx], y[idx])
                for k, idx in calls]

    def combine(self, x: torch.Tensor, weights: torch.Tensor, calls: list[tuple[int, torch.Tensor | None]],
                velocities: list[torch.Tensor]) -> torch.Tensor:
        """sum_k w_k v_k, accumulated in k order (fp32), counting the calls."""
        bshape = (-1,) + (1,) * (x.dim() - 1)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)          # [N, C, H, W]
        for (k, idx), v in zip(calls, velocities, strict=True):
            w = weights[:, k]                                                     # [N]
            if idx is None:
                out += w.reshape(bshape) * v.float()                              # [N, C, H, W]
            else:
                out.index_add_(0, idx, w[idx].reshape(bshape) * v.float())        # [n_k, C, H, W]
            self.expert_calls += 1
            self.expert_samples[k] += x.shape[0] if idx is None else idx.numel()
        return out

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """Guided velocity v_u + s (v_c - v_u), routed on the conditional branch (see the module doc)."""
        null = torch.full_like(y, self.num_classes)
        v_cond, v_uncond = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)


def from_models(experts: Sequence[nn.Module], router: nn.Module, mode: str = "top-1",
                class_counts: Sequence[Sequence[int]] | None = None) -> Ensemble:
    """An in-memory ensemble (eval mode) from expert modules (index = shard id) and a router module;
    class_counts [K][C] (the manifest's) enables sample-once routing."""
    return Ensemble(experts, router, mode, class_counts=class_counts).eval()


# ----------------------------------------------------------------------------------------------------
# ensemble.json
# ----------------------------------------------------------------------------------------------------

class EnsembleSpec(BaseModel):
    """What `ensemble.json` records; experts/router URIs may be relative to the file's directory."""
    model_config = ConfigDict(extra="forbid")
    format_version: int = Field(description="Layout version of ensemble.json (FORMAT_VERSION).")
    experts: dict[int, str] = Field(description="Expert checkpoint URI by shard id (0..K-1).")
    router: str = Field(description="Router checkpoint URI.")
    data_manifest_sha256: str = Field(description="sha256 of the data manifest.json every part was trained on.")
    shard_sha256: dict[int, str] = Field(description="sha256 of each shard, copied from that manifest.")
    config_hash: str = Field(description="sha256 of the resolved config of the training run.")
    shard_class_counts: list[list[int]] | None = Field(
        None, description="Samples of each class in each shard [K][C], copied from that manifest: p(k | y) "
        "for sample-once routing, so sampling needs no access to the data.")
    data_url: str | None = Field(None, description="Where the data was (re-checked at load when reachable).")
    name: str | None = Field(None, description="Run name.")
    created_at: float = Field(default_factory=time.time, description="Unix time of writing.")


def _resolve(base_url: str, uri: str) -> str:
    """Absolute URI: `uri` as is if it has a scheme or is absolute, else relative to base_url's directory."""
    if "://" in uri or uri.startswith("/"):
        return uri
    base = base_url.rsplit("/", 1)[0] if "/" in base_url else "."
    return storage.join(base, uri)


def _ensemble_file(url: str) -> str:
    return url if url.endswith(".json") else storage.join(url, ENSEMBLE_FILE)


def _expert_meta(url: str, k: int) -> dict[str, Any]:
    from archipelago.experts.checkpoint import read_meta

    try:
        return read_meta(url)
    except CheckpointError as exc:
        raise EnsembleError(f"expert {k}: {exc}") from None


def _router_meta(url: str) -> dict[str, Any]:
    from archipelago.router.train import read_router_meta

    try:
        return read_router_meta(url)
    except CheckpointError as exc:
        raise EnsembleError(f"router: {exc}") from None


def check_compatible(spec: EnsembleSpec, expert_metas: dict[int, dict[str, Any]], router_meta: dict[str, Any],
                     expert_urls: dict[int, str], router_url: str) -> None:
    """Every check that makes K checkpoints one ensemble; the first failure is one EnsembleError line."""
    ids = sorted(expert_metas)
    if ids != list(range(len(ids))):
        raise EnsembleError(f"expert ids {ids} must be 0..K-1 (one expert per shard)")
    if sorted(spec.shard_sha256) != ids:
        raise EnsembleError(f"the data manifest has {len(spec.shard_sha256)} shards but the ensemble names "
                            f"{len(ids)} experts")
    ref = expert_metas[0]
    ref_args = (ref.get("model") or {}).get("args", {})
    for k in ids:
        meta, where = expert_metas[k], storage.join(expert_urls[k], "meta.json")
        model = meta.get("model") or {}
        if model.get("class") != ref["model"].get("class"):
            raise EnsembleError(f"expert {k} ({where}): model class {model.get('class')} differs from expert 0's "
                                f"{ref['model'].get('class')}")
        args = model.get("args", {})
        for field in sorted(set(args) | set(ref_args)):
            if args.get(field) != ref_args.get(field):
                raise EnsembleError(f"expert {k} ({where}): {field}={args.get(field)!r} differs from expert 0's "
                                    f"{ref_args.get(field)!r}; experts of one ensemble must share architecture, "
                                    f"latent shape and class set")
        if list(meta.get("image_shape") or []) != list(ref.get("image_shape") or []):
            raise EnsembleError(f"expert {k} ({where}): latent shape {meta.get('image_shape')} differs from expert "
                                f"0's {ref.get('image_shape')}")
        for field in SAMPLER_FIELDS:
            a, b = (meta.get("expert") or {}).get(field), (ref.get("expert") or {}).get(field)
            if a != b:
                raise EnsembleError(f"expert {k} ({where}): sampler setting expert.{field}={a!r} differs from "
                                    f"expert 0's {b!r}")
        if meta.get("shard") is not None and meta.get("shard") != k:
            raise EnsembleError(f"expert {k} ({where}): was trained on shard {meta.get('shard')}, not shard {k}")
        if meta.get("data_manifest_sha256") != spec.data_manifest_sha256:
            raise EnsembleError(f"expert {k} ({where}): trained on data manifest "
                                f"{str(meta.get('data_manifest_sha256'))[:12]}…, the ensemble's is "
                                f"{spec.data_manifest_sha256[:12]}… (other data)")
        if meta.get("shard_sha256") != spec.shard_sha256[k]:
            raise EnsembleError(f"expert {k} ({where}): shard sha256 {str(meta.get('shard_sha256'))[:12]}… does "
                                f"not match the manifest's shard {k} ({spec.shard_sha256[k][:12]}…)")
    r_where = storage.join(router_url, "meta.json")
    if int(router_meta.get("num_experts", -1)) != len(ids):
        raise EnsembleError(f"router ({r_where}): predicts K={router_meta.get('num_experts')} clusters but the "
                            f"ensemble has {len(ids)} experts")
    if router_meta.get("data_manifest_sha256") != spec.data_manifest_sha256:
        raise EnsembleError(f"router ({r_where}): trained on data manifest "
                            f"{str(router_meta.get('data_manifest_sha256'))[:12]}…, the ensemble's is "
                            f"{spec.data_manifest_sha256[:12]}… (other data)")
    if list(router_meta.get("image_shape") or []) != list(ref.get("image_shape") or []):
        raise EnsembleError(f"router ({r_where}): input shape {router_meta.get('image_shape')} differs from the "
                            f"experts' {ref.get('image_shape')}")


def write_ensemble(url: str, experts: dict[int, str] | Sequence[str], router: str, data_url: str,
                   config_hash: str, name: str | None = None) -> EnsembleSpec:
    """Check that the experts (URIs by shard id) and router belong to the data at data_url, then write
    ensemble.json at `url` (a .json URL, or a directory that gets ensemble.json). Returns the spec."""
    from archipelago.data.shards import load_manifest, manifest_sha256

    expert_urls = dict(enumerate(experts)) if not isinstance(experts, dict) else {int(k): v for k, v in experts.items()}
    try:
        manifest = load_manifest(data_url)
        m_sha = manifest_sha256(data_url)
    except DataError as exc:
        raise EnsembleError(f"cannot write the ensemble: {exc}") from None
    spec = EnsembleSpec(format_version=FORMAT_VERSION, experts=expert_urls, router=router,
                        data_manifest_sha256=m_sha, shard_sha256={s.id: s.sha256 for s in manifest.shards},
                        shard_class_counts=manifest.class_counts,
                        config_hash=config_hash, data_url=data_url, name=name)
    metas = {k: _expert_meta(u, k) for k, u in expert_urls.items()}
    check_compatible(spec, metas, _router_meta(router), expert_urls, router)
    storage.write_json(_ensemble_file(url), spec.model_dump(mode="json"))
    return spec


def read_spec(url: str) -> EnsembleSpec:
    """Parse ensemble.json (EnsembleError one line if missing, malformed or another version)."""
    f = _ensemble_file(url)
    try:
        raw = storage.read_json(f)
    except StorageError as exc:
        raise EnsembleError(f"{exc}") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        got = raw.get("format_version") if isinstance(raw, dict) else None
        raise EnsembleError(f"{f}: not an ensemble.json of format version {FORMAT_VERSION} (got {got!r})")
    try:
        return EnsembleSpec.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        raise EnsembleError(f"{f}: field '{'.'.join(map(str, e['loc']))}': {e['msg']}") from None


def verified_members(url: str) -> tuple[EnsembleSpec, dict[int, str], str, dict[int, dict[str, Any]]]:
    """(spec, expert URL by shard id, router URL, expert metas) of ensemble.json after every check that
    `load_ensemble` makes, reading metadata only (no weights): parallel launchers verify on the driver and
    let each rank load just the experts it holds.

    Checks: all experts share architecture (latent shape, class set, dims) and sampler settings; each was
    trained on the ensemble's data manifest and on the shard whose sha256 the manifest lists for its id;
    the router was trained on the same manifest and predicts K = number of experts; and, when the data is
    still reachable at the recorded data_url, that its manifest is the one pinned here.
    """
    from archipelago.data.shards import manifest_sha256

    f = _ensemble_file(url)
    spec = read_spec(url)
    expert_urls = {k: _resolve(f, u) for k, u in spec.experts.items()}
    router_url = _resolve(f, spec.router)
    metas = {k: _expert_meta(u, k) for k, u in expert_urls.items()}
    check_compatible(spec, metas, _router_meta(router_url), expert_urls, router_url)
    if spec.data_url is not None:
        try:
            current = manifest_sha256(spec.data_url)
        except (DataError, StorageError):
            current = None   # data moved or not mounted here: the pinned hashes above are what we check
        if current is not None and current != spec.data_manifest_sha256:
            raise EnsembleError(f"{f}: the data manifest at {spec.data_url} changed since the ensemble was "
                                f"written ({current[:12]}… vs {spec.data_manifest_sha256[:12]}…); re-train or "
                                f"point data_url at the original data")
    return spec, expert_urls, router_url, metas


def load_ensemble(url: str, mode: str = "top-1", device: str | torch.device = "cpu") -> Ensemble:
    """Verify (`verified_members`) and load an ensemble (eval mode) from ensemble.json; the spec is at
    `.spec`."""
    from archipelago.experts.checkpoint import load_expert
    from archipelago.router.train import load_router

    spec, expert_urls, router_url, metas = verified_members(url)
    experts = []
    for k in sorted(expert_urls):
        try:
            experts.append(load_expert(expert_urls[k], device=device)[0])
        except CheckpointError as exc:
            raise EnsembleError(f"expert {k}: {exc}") from None
    try:
        router, _ = load_router(router_url, device=device)
    except CheckpointError as exc:
        raise EnsembleError(f"router: {exc}") from None
    ens = from_models(experts, router, "top-1", class_counts=spec.shard_class_counts)
    ens.mode = mode
    ens.spec = spec
    ens.image_shape = tuple(metas[0].get("image_shape") or ())
    ens.data_space = metas[0].get("data_space")   # every member shares the manifest, hence the data space
    return ens
