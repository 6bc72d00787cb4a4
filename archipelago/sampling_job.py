"""One `archipelago generate` run: the config tree (`inference:` plus the sampler fields of `expert:`) decides
what to sample and how it is spread over ranks; this module samples on one device or N ranks and writes the
picture, the tensors and the per-rank stats. The CLI only turns its flags into config overrides.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from archipelago.config import ArchipelagoConfig, Mode
from archipelago.errors import ConfigError

# generate's flags and the config fields they override (`--flag v` = `--set field=v`)
FLAG_FIELDS: dict[str, str] = {
    "mode": "inference.routing", "n": "inference.num_samples", "seed": "inference.seed",
    "parallel": "inference.mode", "world_size": "inference.world_size", "launcher": "inference.launcher",
    "patch_mode": "inference.patch_mode", "warmup_steps": "inference.warmup_steps",
    "comm_group_layers": "inference.comm_group_layers", "cfg_degree": "inference.cfg_degree",
    "ulysses_degree": "inference.ulysses_degree", "ring_degree": "inference.ring_degree",
    "pipe_patches": "inference.pipe_patches",
    "cfg_scale": "expert.cfg_scale", "steps": "expert.sample_steps", "sampler": "expert.sampler",
}


def flag_overrides(**flags: object) -> list[str]:
    """`--set`-style overrides for the flags that were given (None: not given, the config decides)."""
    unknown = set(flags) - set(FLAG_FIELDS)
    if unknown:
        raise ValueError(f"no config field for {sorted(unknown)}")
    return [f"{FLAG_FIELDS[k]}={v}" for k, v in flags.items() if v is not None]


@dataclass
class GenerateRequest:
    """What the config does not hold: where the model is and where the outputs go."""
    source: str                       # ensemble.json URL (or its directory) or one expert checkpoint
    is_ensemble: bool
    out: str = "grid.png"             # PNG grid (GIF for video experts)
    save_tensor: str | None = None    # samples + labels as safetensors (for eval)
    device: str = "cpu"
    ray_address: str | None = None    # launcher ray: the cluster (default: $RAY_ADDRESS, else a local Ray)
    stats: str | None = None          # JSON: every rank's latency, peak memory and bytes sent
    pin: list[str] | None = None      # launcher ray: one Ray resource per rank
    vae: str | None = None            # latent models: decode with this VAE directory
    verbose: bool = False             # parallel: the ranks' output on the console instead of a log file


def run_generate(cfg: ArchipelagoConfig, req: GenerateRequest, echo: Callable[[str], None]) -> None:
    """Sample as `cfg` says, write the outputs, echo one summary line."""
    inf = cfg.inference
    if req.is_ensemble:   # checked before any weights are read
        from archipelago.ensemble import parse_mode
        from archipelago.errors import EnsembleError

        try:
            parse_mode(inf.routing)
        except EnsembleError as exc:
            raise ConfigError(f"generate: --mode: {exc}") from None
    if inf.mode is Mode.single:
        _single(cfg, req, echo)
    else:
        _parallel(cfg, req, echo)


def samples_meta(source: str, mode: str | None, cfg_scale: float, seed: int, steps: int, sampler: str,
                 compile: bool = False) -> dict[str, object]:
    """The samples file's metadata (generate's both paths, and `archipelago serve`'s safetensors)."""
    return {"source": source, "mode": mode, "cfg_scale": cfg_scale, "seed": seed, "steps": steps,
            "sampler": sampler, "compile": compile}


def _meta(cfg: ArchipelagoConfig, req: GenerateRequest) -> dict[str, object]:
    e = cfg.expert
    return samples_meta(req.source, cfg.inference.routing if req.is_ensemble else None, e.cfg_scale,
                        cfg.inference.seed, e.sample_steps, e.sampler, e.compile)


def _single(cfg: ArchipelagoConfig, req: GenerateRequest, echo: Callable[[str], None]) -> None:
    from archipelago.data.latents import decoder_for
    from archipelago.generate import (
        default_classes,
        generate,
        load_sampler_model,
        save_samples,
        write_picture,
    )

    inf, e = cfg.inference, cfg.expert
    t0 = time.perf_counter()
    model = load_sampler_model(req.source, mode=inf.routing, device=req.device)
    if e.compile:
        from archipelago.experts.precision import compile_for_sampling

        compile_for_sampling(model)
    codec = decoder_for(getattr(model, "data_space", None), req.source, vae_path=req.vae)   # before sampling
    labels = default_classes(inf.num_samples, model.num_classes)
    x = generate(model, inf.num_samples, cfg_scale=e.cfg_scale, seed=inf.seed, steps=e.sample_steps,
                 sampler=e.sampler, classes=labels, device=req.device)
    write_picture(x if codec is None else codec.decode(x), req.out)   # latent models: decoded by their VAE
    calls = getattr(model, "expert_calls", None)
    if req.save_tensor:
        save_samples(req.save_tensor, x, labels, {**_meta(cfg, req), "expert_calls": calls})
    what = f"ensemble ({inf.routing}, {calls} expert calls)" if req.is_ensemble else "expert"
    echo(f"{inf.num_samples} samples from {what} in {time.perf_counter() - t0:.1f}s -> {req.out}"
         + (f" + {req.save_tensor}" if req.save_tensor else ""))


def _parallel(cfg: ArchipelagoConfig, req: GenerateRequest, echo: Callable[[str], None]) -> None:
    import torch

    from archipelago import storage
    from archipelago.data.latents import decoder_for
    from archipelago.generate import data_space_of, save_samples, write_picture
    from archipelago.inference.config import ParallelConfig
    from archipelago.inference.launch import generate_parallel, sampling_spec
    from archipelago.inference.progress import run_with_bar

    inf, e = cfg.inference, cfg.expert
    pcfg = ParallelConfig.from_inference(inf)
    spec = sampling_spec(req.source, routing=inf.routing, n=inf.num_samples, cfg_scale=e.cfg_scale, seed=inf.seed,
                         steps=e.sample_steps, sampler=e.sampler,
                         device="cuda" if req.device.startswith("cuda") else "cpu", compile=e.compile)
    t0 = time.perf_counter()
    if req.pin is not None and (inf.launcher != "ray" or len(req.pin) != inf.world_size):
        raise ConfigError(f"generate: --pin needs --launcher ray and one resource per rank ({inf.world_size}), "
                          f"got {','.join(req.pin)!r} with --launcher {inf.launcher}")
    codec = decoder_for(data_space_of(req.source), req.source, vae_path=req.vae)   # a wrong VAE fails first
    x, ranks = run_with_bar(lambda steps: generate_parallel(spec.model_copy(update={"progress": steps}), pcfg,
                                                            launcher=inf.launcher, ray_address=req.ray_address,
                                                            rank_resources=req.pin),
                            pcfg.describe(), e.sample_steps, req.verbose, "generate", echo)
    write_picture(x if codec is None else codec.decode(x), req.out)   # latent models: decode after sampling
    if req.save_tensor:
        labels = torch.tensor(spec.labels, dtype=torch.long)
        save_samples(req.save_tensor, x, labels, {**_meta(cfg, req), "mode": inf.routing if spec.router else None,
                                                  "parallel": pcfg.describe(), "launcher": inf.launcher})
    if req.stats:
        storage.write_json(req.stats, {"parallel": pcfg.model_dump(mode="json"), "launcher": inf.launcher,
                                       "ranks": ranks})
    sent = sum(r["comm"].get("total_bytes", 0) for r in ranks)
    peak = max(r["peak_mem_bytes"] for r in ranks)
    echo(f"{inf.num_samples} samples ({pcfg.describe()}, {inf.launcher}) in {time.perf_counter() - t0:.1f}s: "
         f"sampling {max(r['latency_s'] for r in ranks):.2f}s, {sent / 2**20:.1f} MiB sent, peak "
         f"{peak / 2**20:.0f} MiB/rank -> {req.out}" + (f" + {req.save_tensor}" if req.save_tensor else ""))
