"""Vendor KubeRay's CRD schemas (RayCluster, RayJob, RayService; ray.io/v1) for the chart's schema tests.

The tests run offline, so the openAPIV3Schema of each CRD is kept in tests/helm/crds/ as gzipped JSON,
descriptions stripped (they are 80% of a CRD's bytes and validate nothing). Regenerate from a KubeRay
checkout when the supported range moves:

    git clone https://github.com/ray-project/kuberay /tmp/kuberay
    python scripts/vendor_kuberay_schemas.py --kuberay /tmp/kuberay v1.2.2 v1.7.0
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

KINDS = ("rayclusters", "rayjobs", "rayservices")
OUT = Path(__file__).resolve().parents[1] / "tests" / "helm" / "crds"


def strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kuberay", required=True, help="a KubeRay git checkout (with tags)")
    ap.add_argument("tags", nargs="+", help="KubeRay release tags, e.g. v1.2.2 v1.7.0")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for tag in args.tags:
        for kind in KINDS:
            text = subprocess.run(["git", "-C", args.kuberay, "show",
                                   f"{tag}:ray-operator/config/crd/bases/ray.io_{kind}.yaml"],
                                  check=True, capture_output=True, text=True).stdout
            crd = yaml.safe_load(text)
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
            out = OUT / f"kuberay-{tag}-{kind}.json.gz"
            # mtime=0: the same schema gives the same bytes, so a regeneration shows no spurious diff
            out.write_bytes(gzip.compress(json.dumps(schema, sort_keys=True).encode(), mtime=0))
            print(f"{out.relative_to(OUT.parents[2])}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
