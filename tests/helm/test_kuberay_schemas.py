"""Every KubeRay object the chart renders (RayCluster, RayJob, RayService) validates against KubeRay's own CRD
schemas, at both ends of the supported operator range (1.2.2 and 1.7.0), the way `kubectl apply` checks it
with strict field validation: a field the CRD does not know is an error, not silently pruned. The schemas are
vendored by scripts/vendor_kuberay_schemas.py (descriptions stripped, gzipped), so this runs offline."""
from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path

import jsonschema
import pytest

from tests.helm.test_helm_chart import CHART, GPU_EXAMPLE, render, write_values

pytestmark = pytest.mark.e2e

CRDS = Path(__file__).parent / "crds"
VERSIONS = ("v1.2.2", "v1.7.0")
KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
SERVE = {"serve": {"enabled": True, "ensemble": "s3://archipelago/runs/ensemble.json",
                   "token": {"existingSecret": "serve-token", "key": "bearer"}}}


def strict(node):
    """Kubernetes' strict field validation as JSON Schema: objects that list their properties (and do not
    preserve unknown fields) admit no others."""
    if isinstance(node, list):
        return [strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def validator(version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads(gzip.decompress((CRDS / f"kuberay-{version}-{KINDS[kind]}.json.gz").read_bytes()))
    # metadata is the API server's (ObjectMeta), not the CRD's: the CRD schema only says "object"
    return jsonschema.Draft7Validator(strict(schema))


def errors(doc: dict, version: str) -> list[str]:
    return [f"{doc['kind']}/{doc['metadata']['name']} {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(version, doc["kind"]).iter_errors(doc)]


def kuberay_docs(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d.get("apiVersion") == "ray.io/v1"]


@pytest.fixture(scope="module")
def renders(helm, tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("kuberay")
    return {
        "default": render(helm),
        "gpu-example": render(helm, GPU_EXAMPLE),
        "serve": render(helm, write_values(tmp, SERVE)),
        "multisite-site": render(helm, CHART / "examples" / "values-multisite-site.yaml"),
        "multisite-driver": render(helm, CHART / "examples" / "values-multisite-driver.yaml"),
    }


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", ["default", "gpu-example", "serve", "multisite-site", "multisite-driver"])
def test_rendered_objects_validate_against_kuberay_crds(renders, case, version):
    docs = kuberay_docs(renders[case])
    assert docs, f"{case}: the chart rendered no KubeRay object"
    problems = [p for d in docs for p in errors(d, version)]
    assert not problems, "\n".join(problems[:20])


def test_every_kind_is_covered(renders):
    seen = {d["kind"] for docs in renders.values() for d in kuberay_docs(docs)}
    assert seen == set(KINDS), seen


@pytest.mark.parametrize("version", VERSIONS)
def test_an_unknown_or_mistyped_field_is_caught(renders, version):
    """The check can fail: a misspelt field and a wrong type in a rendered RayCluster are both reported."""
    cluster = next(d for d in kuberay_docs(renders["default"]) if d["kind"] == "RayCluster")
    bad = json.loads(json.dumps(cluster))
    bad["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}           # rayStartParams
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    found = "\n".join(errors(bad, version))
    assert "rayStartParam" in found and "replicas" in found, found
