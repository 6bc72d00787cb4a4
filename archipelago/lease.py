"""One writer per run directory: a lease with a fencing token.

A trainer takes the lease of its run URL before it writes anything there. The lease is a numbered object,
`<run>/lease/attempt-00000007.json` {attempt, owner, host, pid, acquired_at, renewed_at, expires_at,
released, inherited}, created with the store's exclusive create (local: link() of a complete temp file;
S3: a conditional PUT, If-None-Match: *), so of two trainers racing for attempt 7 exactly one gets it. The
holder is the highest attempt. A heartbeat thread rewrites the holder's object every ttl/3 with a new
expiry; a new attempt may take over only when the holder released it, its lease expired, or it ran on this
host under a pid that no longer exists (a crash: no need to wait out the ttl).

The attempt number is the **fencing token**: every checkpoint's meta.json carries it. A writer checks,
right before its commit marker, that no higher attempt exists; a stale attempt (a partitioned node whose
island Ray restarted elsewhere) then publishes neither a checkpoint nor `final`. Readers need no clock:
a checkpoint is valid when its token is the holder's, or when the holder *inherited* it (the checkpoints
valid at the moment it took over are listed in its lease object); anything a stale attempt committed
after the takeover is neither, and is never picked.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from archipelago import storage
from archipelago.cluster.local import pid_alive
from archipelago.errors import LeaseError, StorageError

log = logging.getLogger(__name__)

LEASE_DIR = "lease"
ROUTER = "router"           # the name of a router's output (meta.json at the run root) in `inherited`
_PREFIX = "attempt-"


@dataclass
class LeaseRecord:
    attempt: int                      # the fencing token
    owner: str                        # random id of the holding process
    host: str
    pid: int
    acquired_at: float
    renewed_at: float
    expires_at: float
    released: bool = False
    inherited: dict[str, int | None] = field(default_factory=dict)   # checkpoint name -> its token

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (f"host {self.host} pid {self.pid} attempt {self.attempt}, renewed {now - self.renewed_at:.0f}s ago, "
                f"expires in {max(0.0, self.expires_at - now):.0f}s")


def _url(run_url: str, attempt: int) -> str:
    return storage.join(run_url, LEASE_DIR, f"{_PREFIX}{attempt:08d}.json")


def holder(run_url: str) -> LeaseRecord | None:
    """The highest-numbered lease object of the run (its holder, live or not); None when there is none."""
    attempts = sorted(int(n[len(_PREFIX):-5]) for n in storage.listdir(storage.join(run_url, LEASE_DIR))
                      if n.startswith(_PREFIX) and n.endswith(".json") and n[len(_PREFIX):-5].isdigit())
    for attempt in reversed(attempts):
        try:
            return LeaseRecord(**storage.read_json(_url(run_url, attempt)))
        except (StorageError, TypeError) as exc:    # unreadable: an older one still says who held it
            log.warning("%s: unreadable lease object (%s)", _url(run_url, attempt), exc)
    return None


def _free(rec: LeaseRecord, now: float) -> bool:
    return (rec.released or rec.expires_at < now
            or (rec.host == socket.gethostname() and rec.pid != os.getpid() and not pid_alive(rec.pid)))


# ----------------------------------------------------------------------------------------------------
# Readers: is a checkpoint from the attempt that holds (or held, and handed on) the run?
# ----------------------------------------------------------------------------------------------------

def run_and_name(ckpt_url: str) -> tuple[str, str] | None:
    """(run URL, name inside it) of <run>/final or <run>/checkpoints/step-N; None for other layouts."""
    url = ckpt_url.rstrip("/")
    head, _, last = url.rpartition("/")
    if last == "final" and head:
        return head, "final"
    run, _, parent = head.rpartition("/")
    if parent == "checkpoints" and run:
        return run, f"checkpoints/{last}"
    return None


def is_valid(rec: LeaseRecord | None, name: str, token: int | None) -> bool:
    """The reader's rule (see the module docstring); a run that never had a lease accepts everything."""
    if rec is None:
        return True
    if token is not None and token == rec.attempt:
        return True
    return name in rec.inherited and rec.inherited[name] == token


def fenced_out(ckpt_url: str, meta: dict[str, Any], rec: LeaseRecord | None = None,
               where: tuple[str, str] | None = None) -> str | None:
    """Why a checkpoint must not be used (a stale attempt published it after a takeover), or None.
    where: (run URL, name) when the layout is not an expert run's (the router: (out_url, "router"))."""
    where = where or run_and_name(ckpt_url)
    if where is None:
        return None
    run_url, name = where
    rec = holder(run_url) if rec is None else rec
    token = meta.get("fencing_token")
    if is_valid(rec, name, token):
        return None
    return (f"{ckpt_url}: written by attempt {token}, but attempt {rec.attempt} ({rec.host} pid {rec.pid}) holds "
            f"{run_url} and did not inherit it: a stale writer's checkpoint")


def _inheritance(run_url: str, rec: LeaseRecord | None) -> dict[str, int | None]:
    """Checkpoints valid under `rec` right now: what a new attempt taking over from it inherits."""
    names = [f"checkpoints/{n}" for n in storage.listdir(storage.join(run_url, "checkpoints"))] + ["final"]
    out: dict[str, int | None] = {}
    for name in [*names, ROUTER]:
        url = storage.join(run_url, "meta.json") if name == ROUTER else storage.join(run_url, name, "meta.json")
        try:
            if not storage.exists(url):
                continue
            token = storage.read_json(url).get("fencing_token")
        except (StorageError, AttributeError):
            continue
        if is_valid(rec, name, token):
            out[name] = token
    return out


# ----------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------

class RunLease:
    """The lease this process holds on `run_url`; `token` goes into every meta.json it writes."""

    def __init__(self, run_url: str, record: LeaseRecord, ttl_s: float, what: str):
        self.run_url, self.record, self.ttl_s, self.what = run_url, record, ttl_s, what
        self._stop = threading.Event()
        self._lost: str | None = None
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    @property
    def token(self) -> int:
        return self.record.attempt

    @property
    def lost(self) -> bool:
        """A newer attempt took over (as far as the last heartbeat or check saw): write nothing more."""
        return self._lost is not None

    @classmethod
    def acquire(cls, run_url: str, ttl_s: float, what: str, wait_s: float = 0.0) -> RunLease:
        """Take the run's lease, waiting up to `wait_s` for a live holder's to expire; LeaseError (one line
        naming the holder) if it does not."""
        deadline = time.time() + wait_s
        owner = uuid.uuid4().hex
        while True:
            now = time.time()
            cur = holder(run_url)
            if cur is None or _free(cur, now):
                rec = LeaseRecord(attempt=(cur.attempt if cur else 0) + 1, owner=owner, host=socket.gethostname(),
                                  pid=os.getpid(), acquired_at=now, renewed_at=now, expires_at=now + ttl_s,
                                  inherited=_inheritance(run_url, cur))
                if storage.create_exclusive(_url(run_url, rec.attempt), _encode(rec)):
                    if cur is not None and not cur.released:
                        log.warning("%s: took over the lease of %s (attempt %d, %s)", what, run_url, cur.attempt,
                                    "its process is gone" if cur.expires_at >= now else "expired")
                    return cls(run_url, rec, ttl_s, what)
                continue                                  # another trainer won this attempt number: re-read
            if now >= deadline:
                raise LeaseError(f"{run_url}: another trainer is writing this run ({cur.describe(now)}); stop it "
                                 f"or use another output URL (a dead holder's lease expires after "
                                 f"expert.lease_ttl_s)")
            time.sleep(min(1.0, max(0.05, deadline - now)))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except StorageError as exc:   # the store hiccuped: try again next beat; expiry is the backstop
                log.warning("%s: lease renewal failed: %s", self.what, exc)

    def renew(self) -> None:
        cur = holder(self.run_url)
        if cur is not None and cur.attempt > self.token:
            self._lost = (f"{self.what}: attempt {self.token} lost the lease of {self.run_url} to attempt "
                          f"{cur.attempt} ({cur.host} pid {cur.pid}); this stale attempt stops without publishing")
            self._stop.set()
            return
        now = time.time()
        self.record.renewed_at, self.record.expires_at = now, now + self.ttl_s
        storage.write_bytes(_url(self.run_url, self.token), _encode(self.record))

    def fenced(self) -> str | None:
        """Why this attempt may no longer publish (a newer attempt holds the run), or None. Checked right
        before every commit marker."""
        if self._lost:
            return self._lost
        cur = holder(self.run_url)
        if cur is not None and cur.attempt > self.token:
            self._lost = (f"{self.what}: attempt {self.token} lost the lease of {self.run_url} to attempt "
                          f"{cur.attempt} ({cur.host} pid {cur.pid}); this stale attempt stops without publishing")
        return self._lost

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def still_mine(self) -> bool:
        """Cheap check before a small write (a metrics line): trusts the lease while it has not expired by our
        own clock; past that (we were frozen or cut off longer than the ttl) asks the store, and renews."""
        if self._lost:
            return False
        if time.time() < self.record.expires_at:
            return True
        if self.fenced() is not None:
            return False
        self.renew()
        return not self._lost

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (a later attempt takes over at once)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.fenced() is None:
            self.record.released = True
            self.record.expires_at = time.time()
            try:
                storage.write_bytes(_url(self.run_url, self.token), _encode(self.record))
            except StorageError as exc:
                log.warning("%s: could not release the lease: %s", self.what, exc)


def _encode(rec: LeaseRecord) -> bytes:
    return (json.dumps(asdict(rec), indent=2, sort_keys=True) + "\n").encode()
