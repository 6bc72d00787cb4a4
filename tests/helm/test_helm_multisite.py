"""Helm for islands in separate datacenters (issue 21), rendered by the real helm binary: one release per site
(a RayCluster only, using the shared S3 and MLflow endpoints) and a driver release (a RayJob on a cluster of
its own whose config submits island k to site k's dashboard, plus the shared MLflow server). The driver's
rendered config goes through the package's own loader and island resolution, site addresses included."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from tests.helm.test_helm_chart import CHART, env_map, one, pod_specs, render, rendered_config

SITE = CHART / "examples" / "values-multisite-site.yaml"
DRIVER = CHART / "examples" / "values-multisite-driver.yaml"
pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("values", [SITE, DRIVER], ids=["site", "driver"])
def test_multisite_examples_lint(helm, values):
    out = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert out.returncode == 0, out.stdout + out.stderr


def test_site_release_is_a_ray_cluster_on_the_shared_endpoints(helm):
    docs = render(helm, SITE)
    kinds = {d["kind"] for d in docs}
    assert "RayCluster" in kinds and "RayJob" not in kinds
    assert not [d for d in docs if d["kind"] == "Deployment"], "a site runs no MLflow server of its own"
    cluster = one(docs, "RayCluster")["spec"]
    assert cluster["headGroupSpec"]["serviceType"] == "LoadBalancer"      # the driver reaches its dashboard
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["site"]
    values = yaml.safe_load(SITE.read_text())
    for where, spec in pod_specs(docs):
        env = env_map(spec["containers"][0])
        assert env["MLFLOW_TRACKING_URI"]["value"] == values["mlflow"]["externalTrackingUri"], where
        assert env["AWS_ENDPOINT_URL"]["value"] == values["objectStore"]["endpoint"], where
        assert "value" not in env["AWS_SECRET_ACCESS_KEY"] and env["AWS_SECRET_ACCESS_KEY"]["valueFrom"], where


def test_driver_release_submits_each_island_to_its_site(helm, tmp_path):
    from archipelago.cluster.spec import job_sites, resolve_islands

    docs = render(helm, DRIVER)
    assert not [d for d in docs if d["kind"] == "RayCluster"]
    job = one(docs, "RayJob")["spec"]
    assert "rayClusterSpec" in job and job["shutdownAfterJobFinishes"] is True
    assert job["entrypoint"].startswith("archipelago train --config ")
    mlflow_svc = [d for d in docs if d["kind"] == "Service" and "mlflow" in d["metadata"]["name"]]
    assert mlflow_svc and mlflow_svc[0]["spec"]["type"] == "LoadBalancer"     # the sites report to it

    cfg = rendered_config(docs, tmp_path)
    assert cfg.islands.on_site_loss == "resubmit"
    manifest = SimpleNamespace(num_clusters=2, shards=[SimpleNamespace(sha256="0" * 64, count=100)] * 2)
    plans = resolve_islands(cfg, manifest, data_url="s3://archipelago/runs/data")
    assert [p.mode for p in plans] == ["job", "job"]
    assert len(job_sites(cfg, plans)) == 2 and all(p.resources == {} for p in plans)
