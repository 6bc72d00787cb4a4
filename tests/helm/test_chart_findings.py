"""Chart findings of issue 16 (checked against KubeRay's CRDs and controller), one `helm template` test each.

Each test encodes a KubeRay or Kubernetes rule the chart used to break: the autoscaler's token, the minimum
KubeRay version, RayJob retries on a shared cluster, a default install that cannot reach its storage, the
image's Ray version, labels for queueing (Kueue), a config path that collides with /tmp, release names that
are not DNS-1035 labels.
"""
from __future__ import annotations

import re

import pytest
import yaml

from tests.helm.test_helm_chart import (
    CHART,
    FULLNAME,
    REPO,
    one,
    ray_pod_specs,
    render,
    template_raw,
    write_values,
)

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def ray_pods(docs):
    for d in docs:
        if d["kind"] == "RayCluster":
            yield from ray_pod_specs(d["spec"], f"RayCluster/{d['metadata']['name']}")
        elif d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"]:
            yield from ray_pod_specs(d["spec"]["rayClusterSpec"], f"RayJob/{d['metadata']['name']}")


# ----------------------------------------------------------------------------------------------------
# Autoscaler: KubeRay binds its Role to the head pod's service account; the sidecar needs that token.
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["shared", "own"])
def test_autoscaling_mounts_the_token_on_the_head_only(helm, tmp_path, mode):
    job = {"clusterMode": mode, "shutdownAfterJobFinishes": mode == "own"}
    values = write_values(tmp_path, {"ray": {"autoscaling": {"enabled": True}}, "rayJob": job})
    docs = render(helm, values)
    pods = dict(ray_pods(docs))
    assert pods, "no Ray pods rendered"
    for where, spec in pods.items():
        if where.endswith("/head"):
            assert spec["automountServiceAccountToken"] is True, f"{where}: the autoscaler sidecar needs the token"
            assert spec["serviceAccountName"] == FULLNAME
        else:
            assert spec["automountServiceAccountToken"] is False, f"{where}: workers need no API access"


@pytest.mark.e2e
def test_without_autoscaling_no_pod_mounts_a_token(helm):
    for where, spec in ray_pods(render(helm)):
        assert spec["automountServiceAccountToken"] is False, where


# ----------------------------------------------------------------------------------------------------
# KubeRay >= 1.2: submitterConfig and spec.backoffLimit first appear there.
# ----------------------------------------------------------------------------------------------------

def test_minimum_kuberay_is_1_2_everywhere():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["annotations"]["archipelago.dev/requires"] == "kuberay-operator >= 1.2.0"
    deploy = (REPO / "docs" / "deploy.md").read_text()
    assert "KubeRay ≥ 1.2" in deploy
    for text in (deploy, (CHART / "Chart.yaml").read_text(), (CHART / "values.yaml").read_text()):
        assert not re.search(r"(KubeRay|kuberay-operator) *(≥|>=) *1\.1\b", text)


# ----------------------------------------------------------------------------------------------------
# RayJob retries with a shared cluster: rejected by KubeRay >= 1.6, the cluster deleted by older ones.
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_backoff_limit_with_a_shared_cluster_fails_with_one_message(helm):
    out = template_raw(helm, sets=("rayJob.backoffLimit=2",))
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, out.stderr
    assert "rayJob.backoffLimit" in errors[0] and "clusterMode=own" in errors[0]
    # The same retries with the job's own cluster are fine.
    ok = template_raw(helm, sets=("rayJob.backoffLimit=2", "rayJob.clusterMode=own",
                                  "rayJob.shutdownAfterJobFinishes=true"))
    assert ok.returncode == 0, ok.stderr


# ----------------------------------------------------------------------------------------------------
# A default install that cannot reach its storage fails at template time.
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_install_without_storage_credentials_fails_and_names_the_fixes(helm):
    out = template_raw(helm, ambient=False)
    assert out.returncode != 0
    assert "s3://archipelago/runs" in out.stderr
    for fix in ("objectStore.existingSecret", "minio.enabled", "objectStore.ambientCredentials"):
        assert fix in out.stderr, fix


CREDENTIAL_SOURCES = {
    "existing-secret": ("objectStore.existingSecret=team-s3",),
    "irsa-annotation": ("serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/x",),
    "ambient": ("objectStore.ambientCredentials=true",),
    "extra-env": ("extraEnv[0].name=AWS_ACCESS_KEY_ID", "extraEnv[0].valueFrom.secretKeyRef.name=s",
                  "extraEnv[0].valueFrom.secretKeyRef.key=k"),
    "non-s3-root": ("archipelago.config.storage.root=gs://bucket/runs",),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CREDENTIAL_SOURCES), ids=list(CREDENTIAL_SOURCES))
def test_any_credential_source_satisfies_the_storage_check(helm, case):
    out = template_raw(helm, sets=CREDENTIAL_SOURCES[case], ambient=False)
    assert out.returncode == 0, out.stderr


# ----------------------------------------------------------------------------------------------------
# Ray version: the image installs the pinned Ray and the chart declares the same rayVersion.
# ----------------------------------------------------------------------------------------------------

def _pinned_ray() -> str:
    (pin,) = re.findall(r"^ray==([0-9.]+)$", (REPO / "constraints.txt").read_text(), flags=re.MULTILINE)
    return pin


def test_dockerfile_installs_with_the_constraints():
    docker = (REPO / "docker" / "Dockerfile").read_text()
    assert "COPY" in docker and "constraints.txt" in docker.split("COPY", 1)[1]
    installs = [ln for ln in docker.splitlines() if ln.startswith("RUN") and "pip install" in ln]
    assert installs and all("-c constraints.txt" in ln for ln in installs), installs
    ignored = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    assert not [p for p in ignored if p.lstrip("/") in ("constraints.txt", "*.txt", "*")], ignored


@pytest.mark.e2e
def test_ray_version_matches_the_image(helm, tmp_path):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["ray"]["version"] == _pinned_ray()
    own = write_values(tmp_path, {"rayJob": {"clusterMode": "own", "shutdownAfterJobFinishes": True}})
    for docs in (render(helm), render(helm, own)):
        for d in docs:
            if d["kind"] == "RayCluster":
                assert d["spec"]["rayVersion"] == _pinned_ray()
            if d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"]:
                assert d["spec"]["rayClusterSpec"]["rayVersion"] == _pinned_ray()
    out = template_raw(helm, sets=("ray.version=",))
    assert out.returncode != 0 and "/ray/version" in out.stderr


# ----------------------------------------------------------------------------------------------------
# Labels / annotations on the CRs (Kueue) and priorityClassName on the pods.
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_labels_annotations_and_priority_class(helm, tmp_path):
    queue = {"kueue.x-k8s.io/queue-name": "team-a"}
    values = write_values(tmp_path, {
        "ray": {"labels": {"team": "vision"}, "annotations": {"note": "cluster"}},
        "rayJob": {"labels": queue, "annotations": {"note": "job"}},
        "priorityClassName": "training",
        "islands": [{"name": "shard-0", "replicas": 1, "strategy": "single", "priorityClassName": "spot-low"}],
    })
    docs = render(helm, values)
    cluster, job = one(docs, "RayCluster"), one(docs, "RayJob")
    assert cluster["metadata"]["labels"]["team"] == "vision"
    assert cluster["metadata"]["annotations"]["note"] == "cluster"
    assert "archipelago.dev/config-checksum" in cluster["metadata"]["annotations"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["annotations"]["note"] == "job"
    pods = dict(ray_pod_specs(cluster["spec"], "c"))
    assert pods["c/head"]["priorityClassName"] == "training"
    assert pods["c/shard-0"]["priorityClassName"] == "spot-low"
    assert job["spec"]["submitterPodTemplate"]["spec"]["priorityClassName"] == "training"
    # Chart labels cannot be overwritten: the selector labels stay the chart's.
    bad = template_raw(helm, sets=("rayJob.labels.app\\.kubernetes\\.io/instance=x",))
    assert bad.returncode != 0 and "rayJob.labels" in bad.stderr


# ----------------------------------------------------------------------------------------------------
# configPath in /tmp would mount the ConfigMap over the writable /tmp emptyDir.
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("path", ["/tmp/config.yaml", "/dev/shm/config.yaml"])
def test_config_path_on_a_writable_mount_fails(helm, path):
    out = template_raw(helm, sets=(f"archipelago.configPath={path}",))
    assert out.returncode != 0
    assert "archipelago.configPath" in out.stderr and "/etc/archipelago/config.yaml" in out.stderr


@pytest.mark.e2e
def test_no_pod_mounts_two_volumes_at_one_path(helm, tmp_path):
    values = write_values(tmp_path, {"archipelago": {"configPath": "/opt/conf/run.yaml"}})
    for where, spec in ray_pods(render(helm, values)):
        paths = [m["mountPath"] for m in spec["containers"][0]["volumeMounts"]]
        assert len(paths) == len(set(paths)), f"{where}: {paths}"
        assert "/opt/conf" in paths


# ----------------------------------------------------------------------------------------------------
# Release names: KubeRay wants DNS-1035 labels (start with a letter) for RayCluster/RayJob names.
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("release", ["1st", "2024-ddm", "9"])
def test_release_starting_with_a_digit_renders_dns_1035_names(helm, release):
    args = ["template", release, str(CHART), "--namespace", "ml", "--set", "objectStore.ambientCredentials=true"]
    out = helm(*args)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for d in docs:
        if d["kind"] in ("RayCluster", "RayJob", "Service", "Deployment", "ConfigMap", "ServiceAccount"):
            assert DNS_1035.match(d["metadata"]["name"]), f"{d['kind']}: {d['metadata']['name']}"
    cluster = one(docs, "RayCluster")["metadata"]["name"]
    assert release in cluster
    # Names KubeRay derives (<cluster>-head-svc, <cluster>-<group>-worker-xxxxx) stay within 63 characters.
    assert len(cluster) + len("-head-svc") <= 63
