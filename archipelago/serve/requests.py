"""One sampling request, validated the same way for every way of serving an ensemble (the MLflow pyfunc model
and `archipelago serve`): the defaults are `archipelago generate`'s, so a request that names only n gives the
samples of `archipelago generate --n n`, and every problem is one line naming the field."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from archipelago.errors import ArchipelagoError, EnsembleError

FIELDS = ("n", "classes", "steps", "cfg", "seed", "routing", "sampler")


class RequestError(ArchipelagoError):
    """A request the server refuses (HTTP 4xx): bad field, out-of-range value, unknown class or mode."""


@dataclass(frozen=True)
class SampleRequest:
    n: int
    steps: int
    cfg: float
    seed: int
    routing: str
    sampler: str
    classes: tuple[int, ...] | None   # None: generate's default labels 0, 1, ..., C-1, 0, ...

    def labels(self, num_classes: int):
        """The class labels as a long tensor [n]."""
        import torch

        from archipelago.generate import default_classes

        if self.classes is None:
            return default_classes(self.n, num_classes)
        return torch.tensor(self.classes, dtype=torch.long)


def generate_defaults() -> dict[str, Any]:
    """steps, cfg, seed, routing and sampler as `archipelago generate` resolves them without a config."""
    from archipelago.config import ArchipelagoConfig

    d = ArchipelagoConfig()
    return {"steps": d.expert.sample_steps, "cfg": d.expert.cfg_scale, "seed": d.inference.seed,
            "routing": d.inference.routing, "sampler": d.expert.sampler}


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value:
        raise RequestError(f"{name}={value!r} must be an integer")
    return int(value)


def parse_request(row: dict[str, Any], defaults: dict[str, Any], max_n: int, max_steps: int,
                  num_classes: int, num_experts: int | None = None, sample_once: bool = True) -> SampleRequest:
    """A validated SampleRequest from a dict of fields (missing ones take `defaults`). num_experts bounds
    top-k; sample_once False refuses that mode (the ensemble's manifest lacks class counts)."""
    from archipelago.ensemble import SAMPLE_ONCE, parse_mode

    unknown = sorted(set(row) - set(FIELDS))
    if unknown or "n" not in row:
        what = f"unknown field(s) {unknown}" if unknown else "missing field 'n'"
        raise RequestError(f"{what}; fields: {', '.join(FIELDS)}")
    req = {**defaults, **{k: v for k, v in row.items() if k != "classes"}}
    n, steps, seed = _int("n", req["n"]), _int("steps", req["steps"]), _int("seed", req["seed"])
    if isinstance(req["cfg"], bool) or not isinstance(req["cfg"], numbers.Real):
        raise RequestError(f"cfg={req['cfg']!r} must be a number")
    cfg = float(req["cfg"])
    if not 1 <= n <= max_n:
        raise RequestError(f"n={n} must be in [1, {max_n}]")
    if not 1 <= steps <= max_steps:
        raise RequestError(f"steps={steps} must be in [1, {max_steps}]")
    if not 0 <= cfg < float("inf"):
        raise RequestError(f"cfg={cfg} must be >= 0")
    if req["sampler"] not in ("euler", "heun"):
        raise RequestError(f"sampler {req['sampler']!r}; allowed: euler | heun")
    routing = str(req["routing"])
    try:
        k = parse_mode(routing)
    except EnsembleError as exc:
        raise RequestError(f"routing: {exc}") from None
    if num_experts is not None and k is not None and k > num_experts:
        raise RequestError(f"routing {routing} needs at least {k} experts; this ensemble has {num_experts}")
    if routing == SAMPLE_ONCE and not sample_once:
        raise RequestError(f"routing {SAMPLE_ONCE} needs the shards' class counts, which this ensemble lacks")
    classes = row.get("classes")
    if classes is not None and len(classes) == 0:
        classes = None   # [] = the default labels (rows of one DataFrame must all have a list here)
    if classes is not None:
        if isinstance(classes, str | bytes):
            raise RequestError(f"classes must be {n} labels in [0, {num_classes})")
        try:
            labels = tuple(_int("classes", c) for c in list(classes))
        except RequestError:
            raise RequestError(f"classes must be {n} labels in [0, {num_classes})") from None
        if len(labels) != n or any(not 0 <= c < num_classes for c in labels):
            raise RequestError(f"classes must be {n} labels in [0, {num_classes})")
        classes = labels
    return SampleRequest(n=n, steps=steps, cfg=cfg, seed=seed, routing=routing, sampler=str(req["sampler"]),
                         classes=classes)
