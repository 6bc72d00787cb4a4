"""Sites of job-mode islands (issue 21): `islands.on_site_loss` and site addresses validated with the field
named in one line, and a lost site -- a dashboard that stops answering -- failing its island alone (fail) or
moving it to a surviving site (resubmit), every submission recorded. The job API is a stand-in here; the
real thing (namespaces, Ray clusters, moto, an MLflow server) is tests/cluster/test_multisite.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from archipelago.cluster.spec import IslandPlan, resolve_islands
from archipelago.config import ArchipelagoConfig, load_config
from archipelago.errors import ConfigError
from archipelago.orchestration import islands
from archipelago.orchestration.sites import SiteBoard, SiteLost

A, B, C = "http://10.214.0.1:8265", "http://10.214.1.1:8265", "http://10.214.2.1:8265"


def _manifest(k: int = 2) -> SimpleNamespace:
    return SimpleNamespace(num_clusters=k, shards=[SimpleNamespace(sha256=f"{i:064x}", count=100) for i in range(k)])


def _cfg(**islands_kw) -> ArchipelagoConfig:
    return ArchipelagoConfig.model_validate({"data": {"num_clusters": 2}, "islands": islands_kw,
                                             "storage": {"root": "/tmp/unused"}})


def test_on_site_loss_defaults_to_fail_and_rejects_other_values():
    assert ArchipelagoConfig().islands.on_site_loss == "fail"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["islands.on_site_loss=migrate"])
    line = str(err.value)
    assert "\n" not in line and "islands.on_site_loss" in line and "resubmit" in line


@pytest.mark.parametrize("islands_kw, field", [
    ({"per_island": {0: {"address": "http://:8265"}, 1: {"address": B}}}, "islands.per_island.0.address"),
    ({"per_island": {0: {"address": "http://site-a:99999"}, 1: {"address": B}}}, "islands.per_island.0.address"),
    ({"per_island": {0: {"address": "http://site-a:8265/jobs"}, 1: {"address": B}}}, "islands.per_island.0.address"),
    ({"per_island": {0: {"address": A}, 1: {"address": B}}, "sites": ["site-c:8265"]}, "islands.sites.0"),
    ({"per_island": {0: {"address": A}, 1: {"address": A}}, "on_site_loss": "resubmit"}, "islands.on_site_loss"),
])
def test_bad_site_addresses_fail_in_one_line_naming_the_field(islands_kw, field):
    with pytest.raises(ConfigError) as err:
        resolve_islands(_cfg(**islands_kw), _manifest(), data_url="/tmp/unused/data")
    line = str(err.value)
    assert "\n" not in line and f"field '{field}'" in line, line


def test_resubmit_with_a_standby_site_is_valid():
    cfg = _cfg(per_island={0: {"address": A}, 1: {"address": A}}, on_site_loss="resubmit", sites=[C])
    plans = resolve_islands(cfg, _manifest(), data_url="/tmp/unused/data")
    assert [p.mode for p in plans] == ["job", "job"]


class FakeSite:
    """The job API of one site: `dead` sites refuse every call (as a deleted namespace's address does)."""

    def __init__(self, address: str, dead: bool = False):
        self.address, self.dead, self.submitted = address, dead, []

    def _check(self) -> None:
        if self.dead:
            raise ConnectionError(f"{self.address}: network is unreachable")

    def get_version(self) -> str:
        self._check()
        return "1"

    def submit_job(self, entrypoint: str, **kw) -> str:
        self._check()
        self.submitted.append(entrypoint)
        return f"job-{len(self.submitted)}"

    def get_job_status(self, job_id: str):
        from ray.job_submission import JobStatus

        self._check()
        return JobStatus.SUCCEEDED


@pytest.fixture
def sites(monkeypatch):
    """{address: FakeSite}; site A dies right after accepting island 0's job."""
    table = {a: FakeSite(a) for a in (A, B, C)}
    real_status = FakeSite.get_job_status

    def status(self, job_id):
        if self.address == A:
            self.dead = True
        return real_status(self, job_id)

    monkeypatch.setattr(FakeSite, "get_job_status", status)
    monkeypatch.setattr("archipelago.cluster.local.job_client", lambda address: table[address])
    return table


def _plan(tmp_path) -> IslandPlan:
    return IslandPlan(shard=0, name="island-0", num_workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0,
                      strategy="single", address=A, data_url=str(tmp_path / "data"),
                      out_url=str(tmp_path / "experts" / "expert-0"))


def test_site_loss_fails_the_island_under_fail(sites, tmp_path):
    cfg = _cfg(site_loss_timeout_s=0.2)
    attempts: list = []
    with pytest.raises(SiteLost, match="has not answered"):
        islands.run_island_job(_plan(tmp_path), cfg, max_failures=3, poll_s=0.05,
                               sites=SiteBoard([A, B], "fail", 0.2), attempts=attempts)
    assert [(a.address, a.status) for a in attempts] == [(A, "site_lost")]
    assert sites[B].submitted == []                       # nothing moved without a person deciding


def test_site_loss_resubmits_to_a_surviving_site_under_resubmit(sites, tmp_path):
    cfg = ArchipelagoConfig.model_validate({"data": {"num_clusters": 2}, "expert": {"lease_ttl_s": 4.0},
                                            "islands": {"on_site_loss": "resubmit", "site_loss_timeout_s": 0.2},
                                            "storage": {"root": "/tmp/unused"}})
    board = SiteBoard([A, B, C], "resubmit", 0.2)
    sites[B].dead = True                                   # the next site in line is down too: skipped
    attempts: list = []
    job = islands.run_island_job(_plan(tmp_path), cfg, max_failures=0, poll_s=0.05, sites=board, attempts=attempts)
    assert job == "job-1" and len(sites[C].submitted) == 1 and sites[B].submitted == []
    assert [(a.address, a.status) for a in attempts] == [(A, "site_lost"), (C, "succeeded")]
    assert board.is_lost(A) and board.is_lost(B) and not board.is_lost(C)
    # The resumed attempt waits out the lease of the one lost with its site (another host: it must expire).
    assert "--lease-wait-s 6" in sites[C].submitted[0]


def test_no_surviving_site_is_one_line(sites, tmp_path):
    cfg = ArchipelagoConfig.model_validate({"islands": {"on_site_loss": "resubmit"}})
    sites[B].dead = True
    with pytest.raises(SiteLost) as err:
        islands.run_island_job(_plan(tmp_path), cfg, max_failures=0, poll_s=0.05,
                               sites=SiteBoard([A, B], "resubmit", 0.2))
    assert "no surviving site" in str(err.value) and "\n" not in str(err.value)
