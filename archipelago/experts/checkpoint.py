"""The one checkpoint format of an expert run, and the one way to read it back.

    run_url/checkpoints/step-00000100/   model.safetensors   raw (trained) weights, full
                                         ema.safetensors     EMA weights: what sampling uses
                                         rng.safetensors     per-rank RNG states (torch + noise generator)
                                         optimizer/...       strategy-specific (see "Optimizer state" below)
                                         meta.json           written LAST: the commit marker
    run_url/final/                       the same layout, for the last step

A directory without meta.json is incomplete (the writer died) and is ignored; `latest()` also checks every
file's sha256 against meta.json. Every write goes through `archipelago.storage` (atomic; local, memory://,
s3://). Nothing here unpickles: weights are safetensors, structure is JSON (optimizer-state formats and
their safety are described in the "Optimizer state" section below).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from archipelago import storage
from archipelago.errors import CheckpointError, LeaseError, StorageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META = "meta.json"
MODEL = "model.safetensors"
EMA = "ema.safetensors"
RNG = "rng.safetensors"
OPTIM_DIR = "optimizer"
_STEP_PREFIX = "step-"
_PURGING = ".purging-"          # a local checkpoint directory being deleted (never listed as a step)


def model_classes() -> dict[str, type[nn.Module]]:
    """Expert architectures a checkpoint may name (meta.json `model.class`)."""
    from archipelago.experts import MODEL_CLASSES

    return dict(MODEL_CLASSES)


def model_record(model: nn.Module) -> dict[str, Any]:
    """{"class": ..., "args": constructor kwargs} of an unwrapped expert (what rebuilds it)."""
    from archipelago.experts.dit import model_args

    return {"class": type(model).__name__, "args": model_args(model)}


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a collective; obj itself without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def encode_tensors(tensors: dict[str, torch.Tensor], kind: str) -> bytes:
    from archipelago.tensorfile import save_bytes

    return save_bytes({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                      metadata={"format": "pt", "archipelago": kind})


def decode_tensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """safetensors bytes -> tensors; a truncated / foreign (e.g. pickle) file is one CheckpointError line."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # noqa: BLE001 - SafetensorError, ValueError, OSError
        raise CheckpointError(f"{name}: not a valid safetensors file ({type(exc).__name__}: truncated, "
                              f"corrupt, or another format such as a pickle)") from None


class CheckpointManager:
    """Save / find / purge checkpoints of one expert run under `run_url`.

    `save` is a collective (call it on every rank): rank 0 writes weights, EMA, RNG and meta.json, every
    rank writes its own optimizer shard (FSDP2, DeepSpeed); then all ranks meet at a barrier.
    `run_meta` (config hash, model record, shard and data hashes) is merged into every meta.json.
    """

    def __init__(self, run_url: str, keep: int = 2, run_meta: dict[str, Any] | None = None, lease: Any = None):
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        self.run_url = run_url.rstrip("/")
        self.keep = keep
        self.run_meta = dict(run_meta or {})
        self.lease = lease     # archipelago.lease.RunLease of rank 0 (None: unfenced, e.g. other ranks)

    # --- layout ---
    @property
    def checkpoints_url(self) -> str:
        return storage.join(self.run_url, "checkpoints")

    @property
    def final_url(self) -> str:
        return storage.join(self.run_url, "final")

    def step_url(self, step: int) -> str:
        return storage.join(self.checkpoints_url, f"{_STEP_PREFIX}{step:08d}")

    def steps(self) -> list[int]:
        """Steps that have a checkpoint directory (complete or not), ascending."""
        out = []
        for name in storage.listdir(self.checkpoints_url):
            if name.startswith(_STEP_PREFIX) and name[len(_STEP_PREFIX):].isdigit():
                out.append(int(name[len(_STEP_PREFIX):]))
        return sorted(out)

    def complete_steps(self) -> list[int]:
        """Steps whose meta.json exists (not hash-verified), ascending."""
        return [s for s in self.steps() if storage.exists(storage.join(self.step_url(s), META))]

    # --- saving ---
    def save(self, step: int, wrapped: Any, ema: Any, rng: dict[str, torch.Tensor] | None = None,
             metrics: dict[str, Any] | None = None, final: bool = False) -> str:
        """Write checkpoint `step` (and, if final, a copy at run_url/final/); returns its URL.

        wrapped: parallelize.Wrapped (weights and optimizer state); ema: experts.ema.EMA (a plain full
        model on every rank); rng: this rank's RNG states (name -> uint8 tensor).
        """
        t0 = time.perf_counter()
        rank, world_size = _rank_world()
        url = self.step_url(step)
        # A stale attempt (a newer one holds the lease) touches nothing: not even another attempt's meta.json.
        fenced = _from_rank0(self.lease.fenced() if rank == 0 and self.lease is not None else None)
        if fenced is not None:
            raise LeaseError(fenced)
        if rank == 0:  # a directory left by a killed writer must not look complete while we rewrite it
            storage.remove(storage.join(url, META))
        _barrier()

        # Weights (gathering is a collective for FSDP2 / ZeRO-3), EMA, RNG of every rank.
        full = wrapped.full_state_dict()
        rngs = _gather_objects({k: v.detach().cpu() for k, v in (rng or {}).items()})
        files: dict[str, str] = {}
        if rank == 0:
            files[MODEL] = storage.write_bytes(storage.join(url, MODEL), encode_tensors(full, "model"))
            files[EMA] = storage.write_bytes(storage.join(url, EMA), encode_tensors(ema.state_dict(), "ema"))
            flat = {f"rank{r}.{k}": v for r, states in enumerate(rngs) for k, v in states.items()}
            files[RNG] = storage.write_bytes(storage.join(url, RNG), encode_tensors(flat, "rng"))
        del full

        # Optimizer state: each rank writes locally, then uploads its own files through storage.
        with tempfile.TemporaryDirectory(prefix="archipelago-optim-") as tmp:
            wrapped.save_optimizer(Path(tmp))
            mine = storage.upload_dir(Path(tmp), storage.join(url, OPTIM_DIR))
        for rank_files in _gather_objects(mine):
            for rel, digest in rank_files.items():
                name = f"{OPTIM_DIR}/{rel}"
                if files.get(name, digest) != digest:
                    raise CheckpointError(f"{name}: written by two ranks with different contents")
                files[name] = digest

        # meta.json last: the commit marker -- unless a newer attempt took the run's lease (fencing).
        fenced = None
        if rank == 0:
            meta = {**self.run_meta, "format_version": FORMAT_VERSION, "step": step, "final": final,
                    "strategy": wrapped.strategy, "world_size": world_size,
                    "zero_stage": wrapped.cfg.zero_stage if wrapped.strategy == "deepspeed" else None,
                    "files": files, "metrics": dict(metrics or {}), "created_at": time.time(),
                    "torch_version": torch.__version__}
            if self.lease is not None:
                meta["fencing_token"] = self.lease.token
                fenced = self.lease.fenced()
            if fenced is None:
                storage.write_json(storage.join(url, META), meta)
                if final:
                    fenced = self.lease.fenced() if self.lease is not None else None
                    if fenced is None:
                        self._copy(url, self.final_url, meta)
                self.purge()
                log.info("checkpoint step %d -> %s (%.2fs)", step, url, time.perf_counter() - t0)
        fenced = _from_rank0(fenced)           # every rank learns it (and meets here, as at a barrier)
        if fenced is not None:
            raise LeaseError(fenced)
        return self.final_url if final else url

    def _copy(self, src: str, dst: str, meta: dict[str, Any]) -> None:
        storage.remove(storage.join(dst, META))
        for name in meta["files"]:
            storage.write_bytes(storage.join(dst, name), storage.read_bytes(storage.join(src, name)))
        storage.write_json(storage.join(dst, META), meta)

    def clean_stale(self) -> None:
        """At the start of a run (lease held, so no one else writes here): delete what a killed writer left —
        temp files of interrupted atomic writes, checkpoint directories without meta.json, and purges that
        were cut short."""
        for step in self.steps():
            if not storage.exists(storage.join(self.step_url(step), META)):
                storage.remove(self.step_url(step), recursive=True)
                log.info("removed incomplete checkpoint step %d", step)
        if storage.is_local(self.run_url) and storage.local_path(self.run_url).is_dir():
            root = storage.local_path(self.run_url)
            for path in sorted(root.rglob(".*.tmp")) + sorted(root.glob(f"checkpoints/{_PURGING}*")):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                log.info("removed stale temporary %s", path)

    def purge(self) -> None:
        """Delete periodic checkpoints beyond the newest `keep`, and incomplete ones older than those.

        A final checkpoint is never deleted.
        """
        complete = self.complete_steps()
        periodic = [s for s in complete if not self._is_final(s)]
        doomed = set(periodic[:-self.keep]) if len(periodic) > self.keep else set()
        if complete:
            doomed |= {s for s in self.steps() if s < complete[-1] and s not in complete}
        for s in sorted(doomed):
            self._delete(s)
            log.debug("purged checkpoint step %d", s)

    def _delete(self, step: int) -> None:
        """Delete checkpoint `step` so that it is never seen half-deleted: locally it is first renamed out of
        the listing (atomic); elsewhere meta.json, the commit marker, goes first (without it the rest is an
        incomplete directory that readers ignore and clean_stale removes)."""
        url = self.step_url(step)
        if storage.is_local(url):
            src = storage.local_path(url)
            dst = src.with_name(f"{_PURGING}{src.name}")
            try:
                os.replace(src, dst)
            except FileNotFoundError:
                return
            shutil.rmtree(dst, ignore_errors=True)
            return
        storage.remove(storage.join(url, META))
        storage.remove(url, recursive=True)

    def _is_final(self, step: int) -> bool:
        try:
            return bool(storage.read_json(storage.join(self.step_url(step), META)).get("final"))
        except StorageError:
            return False

    # --- finding ---
    def latest(self) -> str | None:
        """URL of the newest checkpoint whose meta.json exists, whose files all match their sha256, and that
        is not a stale attempt's (fencing token: see archipelago/lease.py)."""
        from archipelago.lease import fenced_out, holder

        rec = holder(self.run_url)
        for step in reversed(self.complete_steps()):
            url = self.step_url(step)
            try:
                meta = verify_checkpoint(url)
                why = fenced_out(url, meta, rec)
                if why is None:
                    return url
                log.warning("skipping checkpoint %s", why)
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s", url, exc)
        return None


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------

def save_for_inference(model: nn.Module, url: str) -> str:
    """A final, weights-only checkpoint of an in-memory model (EMA = the model) that `load_expert` reads:
    how benchmarks and tests hand constructed models to the launchers, which take checkpoint URLs."""
    digest = storage.write_bytes(storage.join(url, EMA), encode_tensors(model.state_dict(), "ema"))
    storage.write_json(storage.join(url, META), {
        "format_version": FORMAT_VERSION, "step": 0, "final": True, "strategy": "single", "world_size": 1,
        "model": model_record(model), "files": {EMA: digest}, "metrics": {}, "created_at": time.time(),
        "torch_version": torch.__version__})
    return url


def read_meta_json(url: str, missing: str) -> Any:
    """The parsed JSON at `url` (a meta.json); CheckpointError "<url>: missing (<missing>)" when absent, and
    an unreadable or malformed file as one CheckpointError line too. The caller checks the content."""
    try:
        if not storage.exists(url):
            raise CheckpointError(f"{url}: missing ({missing})")
        return storage.read_json(url)
    except StorageError as exc:
        raise CheckpointError(str(exc)) from None


def read_meta(ckpt_url: str) -> dict[str, Any]:
    """meta.json of a checkpoint, format-checked; CheckpointError (one line) if missing or foreign."""
    url = storage.join(ckpt_url, META)
    meta = read_meta_json(url, "the checkpoint is incomplete or this is not a checkpoint")
    if not isinstance(meta, dict) or "files" not in meta or "model" not in meta:
        raise CheckpointError(f"{url}: not an Archipelago expert checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{url}: format version {meta.get('format_version')}, this Archipelago reads "
                              f"{FORMAT_VERSION}")
    return meta


def read_file(ckpt_url: str, name: str, meta: dict[str, Any]) -> bytes:
    """Bytes of one checkpoint file, checked against its sha256 in meta.json."""
    url = storage.join(ckpt_url, name)
    expected = meta["files"].get(name)
    if expected is None:
        raise CheckpointError(f"{url}: not listed in meta.json")
    try:
        data = storage.read_bytes(url)
    except StorageError as exc:
        raise CheckpointError(str(exc)) from None
    digest = storage.sha256_bytes(data)
    if digest != expected:
        raise CheckpointError(f"{url}: sha256 mismatch with meta.json (file {digest[:12]}…, expected "
                              f"{expected[:12]}…): truncated or modified")
    return data


def read_tensors(ckpt_url: str, name: str, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    return decode_tensors(read_file(ckpt_url, name, meta), storage.join(ckpt_url, name))


def verify_checkpoint(ckpt_url: str) -> dict[str, Any]:
    """Check meta.json and every listed file's sha256; returns meta."""
    meta = read_meta(ckpt_url)
    for name in meta["files"]:
        read_file(ckpt_url, name, meta)
    return meta


def verified_or_none(ckpt_url: str, then: str) -> dict[str, Any] | None:
    """meta of a checkpoint that is complete and verifies; None when there is none yet, or (logged with what
    happens `then`, e.g. "training again") when it is there but does not verify. For "is it done?" checks."""
    if not storage.exists(storage.join(ckpt_url, META)):
        return None
    try:
        meta = verify_checkpoint(ckpt_url)
    except CheckpointError as exc:
        log.warning("%s: checkpoint does not verify (%s); %s", ckpt_url, exc, then)
        return None
    from archipelago.lease import fenced_out

    why = fenced_out(ckpt_url, meta)
    if why is not None:
        log.warning("%s; %s", why, then)
        return None
    return meta


def download_optimizer(ckpt_url: str, meta: dict[str, Any], local_dir: Path) -> None:
    """Fetch optimizer/ files (sha256-checked) into local_dir, for Wrapped.load_optimizer."""
    prefix = f"{OPTIM_DIR}/"
    for name in meta["files"]:
        if name.startswith(prefix):
            dst = Path(local_dir) / name[len(prefix):]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(read_file(ckpt_url, name, meta))


def build_model(meta: dict[str, Any], where: str = "meta.json") -> nn.Module:
    """A fresh plain model from meta's model record (class + constructor kwargs)."""
    record = meta.get("model") or {}
    classes = model_classes()
    cls = classes.get(record.get("class"))
    if cls is None:
        raise CheckpointError(f"{where}: unknown model class {record.get('class')!r} "
                              f"(known: {', '.join(classes)})")
    try:
        return cls(**record.get("args", {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: model args do not build a {cls.__name__} ({exc})") from None


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Strict load; a shape/key mismatch (another architecture) is one CheckpointError line."""
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        raise CheckpointError(f"{name}: weights do not fit the model architecture ({detail[:200]})") from None


def load_expert(ckpt_url: str, ema: bool = True, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(plain single-device DiT/VideoDiT in eval mode, meta) from a checkpoint; EMA weights by default.

    Verifies the sha256 of the weights file against meta.json; never unpickles.
    """
    meta = read_meta(ckpt_url)
    name = EMA if ema else MODEL
    model = build_model(meta, storage.join(ckpt_url, META))
    load_weights(model, read_tensors(ckpt_url, name, meta), storage.join(ckpt_url, name))
    return model.to(device).eval(), meta


def check_resumable(meta: dict[str, Any], ckpt_url: str, model: nn.Module, strategy: str, world_size: int,
                    zero_stage: int | None, expect: dict[str, Any] | None = None) -> None:
    """Refuse to resume into another architecture, onto other data (`expect`: meta fields that must be
    equal, e.g. shard and shard sha256), or with optimizer state the current strategy cannot read."""
    want = model_record(model)
    if meta.get("model") != want:
        have = meta.get("model", {})
        diff = sorted(k for k in set(want["args"]) | set(have.get("args", {}))
                      if want["args"].get(k) != have.get("args", {}).get(k))
        raise CheckpointError(f"{storage.join(ckpt_url, META)}: architecture differs from the config "
                              f"({have.get('class')} vs {want['class']}; fields {', '.join(diff) or 'class'}); "
                              f"use another output URL or the original config")
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise CheckpointError(f"{storage.join(ckpt_url, META)}: {key} is {meta.get(key)!r}, this run has "
                                  f"{value!r}; use another output URL for another shard or data set")
    saved = meta.get("strategy")
    plain = {"single", "ddp"}
    ok = (saved in plain and strategy in plain) or (
        saved == strategy == "fsdp2") or (
        saved == strategy == "deepspeed" and meta.get("world_size") == world_size
        and meta.get("zero_stage") == zero_stage)
    if not ok:
        raise CheckpointError(f"{storage.join(ckpt_url, META)}: optimizer state was written by strategy "
                              f"{saved} (world size {meta.get('world_size')}, zero stage {meta.get('zero_stage')}) "
                              f"and cannot be resumed by {strategy} (world size {world_size}); resume with the "
                              f"original strategy or start a new run")


# ----------------------------------------------------------------------------------------------------
# Optimizer state: safetensors + JSON (single / ddp), safe loading of DCP (fsdp2) and DeepSpeed files
# ----------------------------------------------------------------------------------------------------
#
# Optimizer state on disk, and what loading it trusts:
#   single / ddp  `optimizer.safetensors` (tensors) + `optimizer.json` (structure, scalars): never unpickled.
#   fsdp2         torch.distributed.checkpoint (one `.distcp` file per rank + `.metadata`). Stock DCP loading
#                 unpickles `.metadata` (pickle.load) and non-tensor items (torch.load weights_only=False);
#                 we read `.metadata` with an unpickler that only constructs DCP's own metadata classes
#                 (`SafeFileSystemReader`) and non-tensor items with weights_only=True
#                 (`WeightsOnlyLoadPlanner`), so a crafted file fails to load instead of running code.
#   deepspeed     `engine.save_checkpoint` (`*.pt` files written with torch.save). DeepSpeed loads them with
#                 `weights_only=False`; before handing them over we load every file once with
#                 `torch.load(weights_only=True)` and an allowlist of the few DeepSpeed classes it pickles, so
#                 a file that would execute code is rejected (CheckpointError) before DeepSpeed sees it.

OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_JSON = "optimizer.json"


def write_optimizer_state(state_dict: dict[str, Any], local_dir: Path) -> None:
    """Write a torch optimizer state_dict as safetensors + JSON, so loading it never unpickles."""
    from safetensors.torch import save_file

    tensors, structure = flatten_optimizer_state(state_dict)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(local_dir / OPTIM_TENSORS))
    (local_dir / OPTIM_JSON).write_text(json.dumps(structure, indent=1, sort_keys=True))


def read_optimizer_state(optimizer: torch.optim.Optimizer, local_dir: Path, strategy: str) -> None:
    """Load what `write_optimizer_state` wrote into optimizer; CheckpointError names the file if it
    is missing or does not fit."""
    from safetensors.torch import load_file

    tensors_path, json_path = local_dir / OPTIM_TENSORS, local_dir / OPTIM_JSON
    for p in (tensors_path, json_path):
        if not p.is_file():
            raise CheckpointError(f"{p.name}: missing from the checkpoint (optimizer state of a "
                                  f"{strategy} run expected)")
    try:
        tensors = load_file(str(tensors_path))
        structure = json.loads(json_path.read_text())
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, structure))
    except (ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{tensors_path.name}: optimizer state does not fit this model "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def flatten_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON structure with scalars and groups)."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        entry: dict[str, Any] = {}
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                key = f"state.{pid}.{name}"
                tensors[key] = value
                entry[name] = {"tensor": key}
            else:
                entry[name] = {"value": value}
        state[str(pid)] = entry
    return tensors, {"format": "torch-optimizer-v1", "state": state, "param_groups": sd["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    if structure.get("format") != "torch-optimizer-v1":
        raise ValueError(f"unknown optimizer state format {structure.get('format')!r}")
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in structure["state"].items():
        state[int(pid)] = {name: (tensors[v["tensor"]] if "tensor" in v else v["value"])
                           for name, v in entry.items()}
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in structure["param_groups"]]
    return {"state": state, "param_groups": groups}


def check_weights_only(path: Path) -> None:
    """Load a torch.save file with the weights-only unpickler (DeepSpeed's few classes allowlisted);
    CheckpointError if it holds anything else (e.g. a pickle that would run code)."""
    allowed = _deepspeed_safe_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise CheckpointError(f"{path.name}: refused to load: not a weights-only torch file "
                              f"({type(exc).__name__}: {first})") from None


def _deepspeed_safe_globals() -> list[Any]:
    """Non-tensor classes DeepSpeed (ZeRO 1-3, fp32) writes into its checkpoint files."""
    out: list[Any] = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        out.append(LossScaler)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum
        out.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address
        out.append(fragment_address)
    return out


# --- DCP: read `.metadata` and byte items without running arbitrary pickles ---

class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only constructs DCP's metadata classes, torch sizes/dtypes/layouts and paths."""

    _MODULES: ClassVar[tuple[str, ...]] = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
    _NAMES: ClassVar[set[tuple[str, str]]] = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
              ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
              ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:
            if (module, name) in self._NAMES:
                return super().find_class(module, name)
            obj = super().find_class(module, name) if module in self._MODULES or module == "torch" else None
            # Only classes defined in DCP's metadata modules (dataclasses, enums), or torch dtypes.
            if isinstance(obj, type) and obj.__module__ == module and module in self._MODULES:
                return obj
            if module == "torch" and isinstance(obj, torch.dtype):
                return obj
        raise pickle.UnpicklingError(f"DCP metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    """DCP reader whose `.metadata` goes through `_SafeUnpickler` (stock DCP uses pickle.load)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as fh:
                metadata = _SafeUnpickler(fh).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"{path.parent.name}/.metadata: refused to load ({exc})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, but non-tensor items (optimizer hyper-parameters) load with weights_only=True."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
