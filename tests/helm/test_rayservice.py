"""The chart's RayService for `archipelago serve`: off by default; when enabled it renders a valid KubeRay
RayService whose Serve config runs archipelago.serve.app:app_builder with a `serve:` section archipelago
accepts, on the port the head pod exposes, with the bearer token only through a Secret."""
from __future__ import annotations

import importlib

import pytest
import yaml

from tests.helm.test_helm_chart import (
    AMBIENT,
    CHART,
    FULLNAME,
    env_map,
    one,
    pod_specs,
    render,
    template_raw,
    write_values,
)

pytestmark = pytest.mark.e2e

ENSEMBLE = "s3://archipelago/runs/ensemble.json"
SERVE = {"serve": {"enabled": True, "ensemble": ENSEMBLE, "port": 8100,
                   "token": {"existingSecret": "serve-token", "key": "bearer"},
                   "config": {"max_n": 16, "expert_replicas": 2, "batch_max_size": 4}}}


@pytest.fixture(scope="module")
def serve_docs(helm, tmp_path_factory):
    return render(helm, write_values(tmp_path_factory.mktemp("serve"), SERVE))


def test_off_by_default(default_docs_no_serve):
    assert not [d for d in default_docs_no_serve if d["kind"] == "RayService"]


@pytest.fixture(scope="module")
def default_docs_no_serve(helm):
    return render(helm)


def test_rayservice_runs_the_app_builder_with_a_valid_serve_section(serve_docs):
    from archipelago.config import ServeConfig

    svc = one(serve_docs, "RayService", f"{FULLNAME}-serve")
    assert svc["apiVersion"] == "ray.io/v1" and set(svc["spec"]) == {"serveConfigV2", "rayClusterConfig"}
    assert isinstance(svc["spec"]["serveConfigV2"], str)          # KubeRay wants the Serve config as a string
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert app["route_prefix"] == "/" and app["args"]["ensemble"] == ENSEMBLE
    cfg = ServeConfig.model_validate(app["args"]["serve"])         # archipelago accepts what the chart wrote
    assert (cfg.host, cfg.port, cfg.max_n, cfg.expert_replicas, cfg.batch_max_size) == ("0.0.0.0", 8100, 16, 2, 4)
    assert serve_cfg["http_options"] == {"host": "0.0.0.0", "port": 8100}
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] and cluster["headGroupSpec"]["rayStartParams"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["serve"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": 8100} in head["ports"]   # what KubeRay's serve Service targets


def test_token_comes_from_the_secret_on_every_pod(serve_docs):
    svc = one(serve_docs, "RayService", f"{FULLNAME}-serve")
    specs = [(w, s) for w, s in pod_specs([svc])]
    assert len(specs) == 2
    for where, spec in specs:
        for c in spec["containers"]:
            env = env_map(c)["ARCHIPELAGO_SERVE_TOKEN"]
            assert env == {"name": "ARCHIPELAGO_SERVE_TOKEN",
                           "valueFrom": {"secretKeyRef": {"name": "serve-token", "key": "bearer"}}}, where
    token_env = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]["serve"]["token_env"]
    assert token_env == "ARCHIPELAGO_SERVE_TOKEN"


def test_no_token_secret_means_no_token_variable(helm, tmp_path):
    values = {"serve": {**SERVE["serve"], "token": {"existingSecret": ""}}}
    svc = one(render(helm, write_values(tmp_path, values)), "RayService")
    for _, spec in pod_specs([svc]):
        assert "ARCHIPELAGO_SERVE_TOKEN" not in env_map(spec["containers"][0])


def test_enabled_without_an_ensemble_fails_with_one_message(helm):
    out = template_raw(helm, sets=("serve.enabled=true",))
    assert out.returncode != 0 and "serve.ensemble is required" in out.stderr


@pytest.mark.parametrize("values, text", [
    ({"serve": {"enabled": True, "ensemble": ENSEMBLE, "config": {"host": "1.2.3.4"}}}, "serve/config"),
    ({"serve": {"enabled": True, "ensemble": ENSEMBLE, "port": 0}}, "serve/port"),
    ({"serve": {"enabled": True, "ensemble": ENSEMBLE, "token": {"value": "literal"}}}, "serve/token"),
], ids=["host-is-the-charts", "port", "no-literal-token"])
def test_invalid_serve_values_fail_with_the_field(helm, tmp_path, values, text):
    out = template_raw(helm, write_values(tmp_path, values))
    assert out.returncode != 0 and text in out.stderr, out.stderr


def test_lint_with_serve_enabled(helm, tmp_path):
    out = helm("lint", "--strict", str(CHART), "--set", AMBIENT[0], "-f", str(write_values(tmp_path, SERVE)))
    assert out.returncode == 0 and "0 chart(s) failed" in out.stdout, out.stdout + out.stderr
