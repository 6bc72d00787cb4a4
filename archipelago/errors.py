"""Our exception types. The CLI turns any of them into one line on stderr (no traceback unless --debug),
so every message must name the culprit (file, field, URL) and what to do about it."""
from __future__ import annotations

from archipelago.redact import redact


class ArchipelagoError(Exception):
    """Base class: a user-facing error with a one-line message; the CLI prints `<label>: <message>` and exits
    with `exit_code`."""

    exit_code = 2
    label = "error"


class ConfigError(ArchipelagoError):
    """Bad YAML, unknown field, wrong type or value."""


class StorageError(ArchipelagoError):
    """Unreachable store, missing object, bad credentials (never printed)."""


class DataError(ArchipelagoError):
    """Missing/corrupt shard, manifest mismatch, empty source."""


class CheckpointError(ArchipelagoError):
    """Truncated/foreign/incompatible checkpoint."""


class EnsembleError(ArchipelagoError):
    """Experts/router/manifest that do not belong together."""


class DivergenceError(ArchipelagoError):
    """A non-finite loss or gradient norm: the run stopped without publishing a final checkpoint."""


class LeaseError(ArchipelagoError):
    """Another live trainer holds the run directory, or this attempt's lease was taken over (fenced off)."""


PREEMPTED_EXIT = 75   # sysexits EX_TEMPFAIL: "try again later" -- the run checkpointed and can be resumed


class Preempted(ArchipelagoError):
    """SIGTERM (spot/preemptible node): the run checkpointed its last step and exits to be resumed."""

    exit_code = PREEMPTED_EXIT
    label = "preempted"


class NotYetImplemented(ArchipelagoError):
    """A command the design names but this version does not ship yet."""


def failure_line(exc: BaseException) -> str:
    """One line saying why something failed (an island, a Ray connection): our own error message when there
    is one anywhere in the chain, else the root cause; credentials redacted."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    candidates: list[BaseException] = []
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        candidates.append(e)
        for attr in ("worker_failures",):
            failures = getattr(e, attr, None)
            if isinstance(failures, dict):
                stack.extend(v for v in failures.values() if isinstance(v, BaseException))
        for attr in ("cause", "controller_failure", "__cause__", "__context__"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                stack.append(inner)
    for e in candidates:
        if isinstance(e, ArchipelagoError):
            return redact(" ".join(str(e).split()))
    for e in reversed(candidates):
        text = str(e).strip()
        # Ray wraps a worker's exception with its traceback: the last "SomeError: message" line is the cause.
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        for ln in reversed(lines):
            if ":" in ln.split(" ", 1)[0] and not ln.startswith(("File ", "Traceback")):
                return redact(ln[:300])
    return redact(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
