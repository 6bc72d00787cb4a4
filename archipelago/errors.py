"""Our exception types. The CLI turns any of them into one line on stderr (no traceback unless --debug),
so every message must name the culprit (file, field, URL) and what to do about it."""
from __future__ import annotations


class ArchipelagoError(Exception):
    """Base class: a user-facing error with a one-line message."""


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


class NotYetImplemented(ArchipelagoError):
    """A command the design names but this version does not ship yet."""
