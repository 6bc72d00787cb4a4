"""The ensemble as a real MLflow pyfunc model, so `mlflow.pyfunc.load_model("models:/NAME/V").predict(...)` and
`mlflow models serve -m models:/NAME/V` sample from a registered ensemble.

Nothing is pickled: the model is defined by code (`pyfunc_entry.py`, MLflow's models-from-code), its weights
are the experts' and router's safetensors with their sha256-checked meta.json, and ensemble.json is JSON. The
serving environment needs `archipelago` installed (the image of the Helm chart has it).

Input: a DataFrame (or a list of dicts), one row per request, columns
  n (int, required), classes (list of int, length n; absent or [] = 0, 1, ..., C-1, 0, ... as `archipelago
  generate`; in a DataFrame give it in every row or in none, MLflow's schema check rejects a half-empty column),
  steps, cfg, seed, routing (full | top-k | sample-once), sampler (euler | heun);
the defaults are `archipelago generate`'s, so a row gives the same samples as the CLI with the same flags.
Output: {"samples": float32 [N, C, H, W] (unclamped model space), "labels": int64 [N], "request": int64 [N]}
with the rows' samples concatenated in row order.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from archipelago import storage
from archipelago.errors import EnsembleError
from archipelago.serve.requests import SampleRequest

ARTIFACT = "ensemble"                       # context.artifacts key: the packaged ensemble directory
ENTRY = Path(__file__).with_name("pyfunc_entry.py")
# Per-request limits written into the model's config (model_config); a served model refuses more work than this.
DEFAULT_LIMITS = {"max_n": 256, "max_steps": 1000}


# ----------------------------------------------------------------------------------------------------
# Packaging: a self-contained copy of the ensemble (what sampling reads, nothing else)
# ----------------------------------------------------------------------------------------------------

def _copy_checked(src_url: str, name: str, digest: str | None, dst: Path) -> None:
    """Copy one weights file, refusing it when its sha256 is not the one its meta.json records."""
    data = storage.read_bytes(storage.join(src_url, name))
    if digest is None or storage.sha256_bytes(data) != digest:
        raise EnsembleError(f"{storage.join(src_url, name)}: sha256 does not match its meta.json")
    (dst / name).write_bytes(data)


def package_ensemble(ensemble_url: str, dest: Path) -> Path:
    """Copy a verified ensemble into `dest`: ensemble.json (members as relative paths, no data_url: the data
    is not shipped, its hashes stay pinned), each expert's meta.json + EMA weights, the router's meta.json +
    weights. Optimizer and RNG state stay behind; meta.json lists only the copied files, so each copied
    checkpoint still verifies on its own. Returns the path of the packaged ensemble.json."""
    from archipelago.ensemble import ENSEMBLE_FILE, verified_members
    from archipelago.experts.checkpoint import EMA, read_meta
    from archipelago.router.train import WEIGHTS, read_router_meta

    spec, expert_urls, router_url, _ = verified_members(ensemble_url)
    dest.mkdir(parents=True, exist_ok=True)
    experts = {}
    for k, url in sorted(expert_urls.items()):
        rel = f"experts/expert-{k}"
        (dest / rel).mkdir(parents=True, exist_ok=True)
        meta = read_meta(url)
        _copy_checked(url, EMA, meta["files"].get(EMA), dest / rel)
        meta["files"] = {EMA: meta["files"][EMA]}
        (dest / rel / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        experts[k] = rel
    (dest / "router").mkdir(exist_ok=True)
    rmeta = read_router_meta(router_url)
    _copy_checked(router_url, WEIGHTS, rmeta["files"].get(WEIGHTS), dest / "router")
    (dest / "router" / "meta.json").write_text(json.dumps(rmeta, indent=2, sort_keys=True))
    packaged = spec.model_copy(update={"experts": experts, "router": "router", "data_url": None})
    out = dest / ENSEMBLE_FILE
    out.write_text(json.dumps(packaged.model_dump(mode="json"), indent=2, sort_keys=True))
    return out


# ----------------------------------------------------------------------------------------------------
# The pyfunc model
# ----------------------------------------------------------------------------------------------------

def _schema() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([
        ColSpec("long", "n"),
        ColSpec(Array("long"), "classes", required=False),
        ColSpec("long", "steps", required=False),
        ColSpec("double", "cfg", required=False),
        ColSpec("long", "seed", required=False),
        ColSpec("string", "routing", required=False),
        ColSpec("string", "sampler", required=False),
    ])
    return ModelSignature(inputs=inputs)


def _bad(msg: str) -> Exception:
    """An MLflow INVALID_PARAMETER_VALUE error: `mlflow models serve` answers it with HTTP 400 and `msg`."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(msg, error_code=INVALID_PARAMETER_VALUE)


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """Requests as dicts with missing / NaN fields dropped (a DataFrame fills absent cells with NaN)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        records = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        records = [model_input]
    else:
        records = list(model_input)
    rows = []
    for rec in records:
        row = {}
        for k, v in rec.items():
            if v is None or (not hasattr(v, "__len__") and pd.isna(v)):
                continue
            row[k] = v
        rows.append(row)
    return rows


class EnsembleModel:
    """mlflow.pyfunc.PythonModel behaviour (the base class is added in pyfunc_entry.py, where mlflow is
    imported): load the packaged ensemble once, sample every request row like `archipelago generate`."""

    def load_context(self, context: Any) -> None:
        from archipelago.ensemble import ENSEMBLE_FILE, load_ensemble
        from archipelago.serve.requests import generate_defaults

        self.ensemble = load_ensemble(str(Path(context.artifacts[ARTIFACT]) / ENSEMBLE_FILE), mode="top-1")
        self.defaults = generate_defaults()
        self.limits = {**DEFAULT_LIMITS, **(getattr(context, "model_config", None) or {})}

    def _request(self, i: int, row: dict[str, Any]) -> SampleRequest:
        """One validated request; every problem is one 4xx line naming the row and the field."""
        from archipelago.serve.requests import RequestError, parse_request

        try:
            return parse_request(row, self.defaults, self.limits["max_n"], self.limits["max_steps"],
                                 self.ensemble.num_classes)
        except RequestError as exc:
            raise _bad(f"request {i}: {exc}") from None

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> dict[str, Any]:
        import numpy as np

        from archipelago.generate import generate

        requests = [self._request(i, row) for i, row in enumerate(_rows(model_input))]   # all checked first
        samples, labels, index = [], [], []
        for i, r in enumerate(requests):
            y = r.labels(self.ensemble.num_classes)
            try:
                self.ensemble.mode = r.routing
            except EnsembleError as exc:
                raise _bad(f"request {i}: routing: {exc}") from None
            x = generate(self.ensemble, r.n, cfg_scale=r.cfg, seed=r.seed, steps=r.steps, sampler=r.sampler,
                         classes=y)
            samples.append(x.numpy().astype(np.float32))
            labels.append(y.numpy().astype(np.int64))
            index.append(np.full(r.n, i, dtype=np.int64))
        return {"samples": np.concatenate(samples), "labels": np.concatenate(labels),
                "request": np.concatenate(index)}


def save_pyfunc(ensemble_url: str, path: Path, extra_files: dict[str, str] | None = None,
                limits: dict[str, int] | None = None) -> Path:
    """Write the MLflow model of an ensemble at `path` (an MLmodel directory): the packaged ensemble as the
    `ensemble` artifact, pyfunc_entry.py as the model code, the input signature and per-request limits.
    extra_files (name -> URL, e.g. the data manifest) are copied beside MLmodel for provenance."""
    import mlflow

    import archipelago

    with tempfile.TemporaryDirectory(prefix="archipelago-pyfunc-") as tmp:
        packaged = package_ensemble(ensemble_url, Path(tmp) / ARTIFACT).parent
        mlflow.pyfunc.save_model(
            path=str(path), python_model=str(ENTRY), artifacts={ARTIFACT: str(packaged)},
            signature=_schema(), model_config={**DEFAULT_LIMITS, **(limits or {})},
            # With --env-manager local (the image) nothing is installed; elsewhere archipelago must be
            # installable from your index.
            pip_requirements=[f"archipelago=={archipelago.__version__}", f"mlflow=={mlflow.__version__}"],
            metadata={"archipelago.kind": "ensemble"})
    for name, url in (extra_files or {}).items():
        (path / f"{name}.json").write_bytes(storage.read_bytes(url))
    return path
