"""Sites: the independent Ray clusters that job-mode islands run on, and what an island does when its whole
site is lost (`islands.on_site_loss`).

A site is lost when its dashboard -- the only thing the driver talks to there -- has not answered for
`islands.site_loss_timeout_s`: a failed job is not a lost site (that is `max_failures`' business), a silent
dashboard is. The island threads share one `SiteBoard`, so a site one island found dead is never chosen by
another, and each move is recorded as a `JobAttempt` that the pipeline turns into an MLflow run.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from archipelago.cluster.spec import redact_address
from archipelago.errors import ArchipelagoError

log = logging.getLogger(__name__)


class SiteLost(ArchipelagoError):
    """An island's site stopped answering (and, under on_site_loss=resubmit, no surviving site was left)."""


@dataclass
class JobAttempt:
    """One submission of an island's job to one site; status: succeeded | failed | site_lost."""
    attempt: int
    address: str                   # redacted dashboard URL of the site
    job_id: str | None
    status: str
    error: str | None = None
    started_at: float = 0.0
    ended_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SiteBoard:
    """The sites of one run, which of them are lost, and where a lost site's island goes next."""

    def __init__(self, sites: list[str], policy: str = "fail", timeout_s: float = 30.0) -> None:
        self.sites = list(sites)
        self.policy = policy
        self.timeout_s = timeout_s
        self.lost: set[str] = set()
        self._lock = threading.Lock()

    @staticmethod
    def _key(address: str) -> str:
        return address.rstrip("/")

    def mark_lost(self, address: str) -> None:
        with self._lock:
            self.lost.add(self._key(address))

    def is_lost(self, address: str) -> bool:
        with self._lock:
            return self._key(address) in self.lost

    def next_site(self, lost_address: str) -> str | None:
        """The first site, after the lost one in the list's order, that is not lost and answers; None if none.

        Answering = its job API returns its version: a site that is down too is marked lost on the way."""
        from archipelago.cluster.local import job_client

        self.mark_lost(lost_address)
        keys = [self._key(s) for s in self.sites]
        start = keys.index(self._key(lost_address)) + 1 if self._key(lost_address) in keys else 0
        for site in self.sites[start:] + self.sites[:start]:
            if self.is_lost(site):
                continue
            try:
                job_client(site).get_version()
            except Exception as exc:  # noqa: BLE001 - connection errors of several kinds
                log.warning("site %s does not answer either (%s); not moving an island there",
                            redact_address(site), type(exc).__name__)
                self.mark_lost(site)
                continue
            return site
        return None


def poll_job(client: Any, job_id: str, address: str, name: str, timeout_s: float, poll_s: float,
             deadline: float | None = None) -> Any:
    """Wait for a job to end; returns its JobStatus. SiteLost when the site's dashboard has not answered for
    `timeout_s`; TimeoutError (after stopping the job) past `deadline` (time.time())."""
    from ray.job_submission import JobStatus

    last_answer = time.monotonic()
    while True:
        try:
            status = client.get_job_status(job_id)
            last_answer = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - requests' ConnectionError, Ray's RuntimeError, ...
            silent = time.monotonic() - last_answer
            if silent >= timeout_s:
                raise SiteLost(f"{name}: site {redact_address(address)} has not answered for {silent:.0f}s "
                               f"({type(exc).__name__}); job {job_id} is lost with it") from None
            time.sleep(min(poll_s, max(0.1, timeout_s - silent)))
            continue
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        if deadline is not None and time.time() > deadline:
            client.stop_job(job_id)
            raise TimeoutError(f"{name}: job {job_id} did not finish in time")
        time.sleep(poll_s)
