"""The Helm chart, rendered by a real helm binary: lint, rendered objects, schema errors, secret hygiene.

The rendered archipelago config is also loaded with archipelago.config.load_config, so the chart can never
ship a config that `archipelago train` rejects.
"""
from __future__ import annotations

import base64
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "archipelago"
GPU_EXAMPLE = CHART / "examples" / "values-3-islands-gpu.yaml"
RELEASE, NAMESPACE = "arch", "ml"
FULLNAME = f"{RELEASE}-archipelago"


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------

def write_values(tmp_path: Path, values: dict, name: str = "values.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


# Pods have S3 credentials from their environment (IRSA-like): the chart otherwise refuses to render a
# cluster that cannot reach its storage (test_chart_findings.py checks that refusal).
AMBIENT = ("objectStore.ambientCredentials=true",)


def template_raw(helm, *values_files: Path, sets: tuple[str, ...] = (), ambient: bool = True):
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if ambient:
        args += ["--set", AMBIENT[0]]
    for f in values_files:
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    return helm(*args)


def render(helm, *values_files: Path, sets: tuple[str, ...] = ()) -> list[dict]:
    out = template_raw(helm, *values_files, sets=sets)
    assert out.returncode == 0, f"helm template failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def raw_documents(stdout: str) -> list[str]:
    return [d for d in re.split(r"^---\s*$", stdout, flags=re.MULTILINE) if d.strip()]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def env_map(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def pod_specs(docs: list[dict]):
    """(where, pod spec) for every pod template the chart renders, CRDs included."""
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind in ("Deployment", "Job"):
            yield f"{kind}/{name}", d["spec"]["template"]["spec"]
        elif kind == "RayCluster":
            yield from ray_pod_specs(d["spec"], f"RayCluster/{name}")
        elif kind == "RayJob":
            if "rayClusterSpec" in d["spec"]:
                yield from ray_pod_specs(d["spec"]["rayClusterSpec"], f"RayJob/{name}")
            if "submitterPodTemplate" in d["spec"]:
                yield f"RayJob/{name}/submitter", d["spec"]["submitterPodTemplate"]["spec"]
        elif kind == "RayService":
            yield from ray_pod_specs(d["spec"]["rayClusterConfig"], f"RayService/{name}")


def ray_pod_specs(spec: dict, where: str):
    yield f"{where}/head", spec["headGroupSpec"]["template"]["spec"]
    for g in spec["workerGroupSpecs"]:
        yield f"{where}/{g['groupName']}", g["template"]["spec"]


def advertised_resources(group: dict) -> dict:
    """What `ray start` sees: KubeRay appends --resources=<value> to a bash command line; split like bash."""
    (arg,) = shlex.split(f"--resources={group['rayStartParams']['resources']}")
    return json.loads(arg.split("=", 1)[1])


def rendered_config(docs: list[dict], tmp_path: Path):
    """The ConfigMap's config.yaml, validated by the package's own loader."""
    from archipelago.config import load_config

    cm = one(docs, "ConfigMap", f"{FULLNAME}-config")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    return load_config(path)


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


@pytest.fixture(scope="module")
def default_docs(helm):
    return render(helm)


@pytest.fixture(scope="module")
def gpu_docs(helm):
    return render(helm, GPU_EXAMPLE)


@pytest.fixture(scope="module")
def gpu_values():
    return yaml.safe_load(GPU_EXAMPLE.read_text())


# ----------------------------------------------------------------------------------------------------
# Chart metadata
# ----------------------------------------------------------------------------------------------------

def test_chart_app_version_is_the_package_version():
    init = (REPO / "archipelago" / "__init__.py").read_text()
    version = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', init, flags=re.MULTILINE).group(1)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert str(chart["appVersion"]) == version


# ----------------------------------------------------------------------------------------------------
# Lint
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("values", [None, GPU_EXAMPLE], ids=["default", "3-islands-gpu"])
def test_helm_lint(helm, values):
    args = ["lint", "--strict", str(CHART), "--set", AMBIENT[0]] + (["-f", str(values)] if values else [])
    out = helm(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


# ----------------------------------------------------------------------------------------------------
# Default values
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_default_render_has_the_expected_objects(default_docs):
    kinds = {d["kind"] for d in default_docs}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "ServiceAccount", "ConfigMap"} <= kinds
    assert "Secret" not in kinds, "no keys in values, no existingSecret: the chart must not create a Secret"
    assert "Job" not in kinds, "MinIO (and its bucket job) is off by default"
    for d in default_docs:
        if d["kind"] in ("RayCluster", "RayJob"):
            assert d["apiVersion"] == "ray.io/v1"


@pytest.mark.e2e
def test_default_islands_are_worker_groups_pinned_by_custom_resources(default_docs, tmp_path):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    cluster = one(default_docs, "RayCluster", FULLNAME)
    groups = cluster["spec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == [i["name"] for i in values["islands"]]
    assert [g["replicas"] for g in groups] == [i["replicas"] for i in values["islands"]]

    cfg = rendered_config(default_docs, tmp_path)
    assert cfg.data.num_clusters == len(groups)
    for k, g in enumerate(groups):
        advertised = advertised_resources(g)
        island = cfg.islands.per_island[k]
        assert set(island.resources) <= set(advertised), "island k's workers must request group k's resource"
        assert island.strategy == values["islands"][k]["strategy"]
        # CPU islands: DeepSpeed must not look for CUDA.
        env = env_map(g["template"]["spec"]["containers"][0])
        assert env["DS_ACCELERATOR"]["value"] == "cpu"


@pytest.mark.e2e
def test_default_rayjob_reuses_the_chart_cluster_and_runs_archipelago_train(default_docs):
    job = one(default_docs, "RayJob")
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": FULLNAME}
    assert "rayClusterSpec" not in spec
    assert spec["entrypoint"] == "archipelago train --config /etc/archipelago/config.yaml"
    assert spec["submitterConfig"]["backoffLimit"] == 0
    assert spec["shutdownAfterJobFinishes"] is False
    # The driver runs on the head: the ConfigMap must be mounted there at the entrypoint's path.
    head = one(default_docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert mounts["archipelago-config"]["mountPath"] == "/etc/archipelago"
    assert volumes["archipelago-config"]["configMap"]["name"] == f"{FULLNAME}-config"


@pytest.mark.e2e
def test_default_image_tag_is_app_version(default_docs):
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    for where, spec in pod_specs(default_docs):
        for c in spec["containers"]:
            assert c["image"] == f"ghcr.io/archipelago-ml/archipelago:{app_version}", where


@pytest.mark.e2e
def test_mlflow_server_service_probes_and_tracking_uri(default_docs):
    dep = one(default_docs, "Deployment", f"{FULLNAME}-mlflow")
    svc = one(default_docs, "Service", f"{FULLNAME}-mlflow")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["mlflow", "server"]
    assert "--backend-store-uri=sqlite:////mlflow/mlflow.db" in c["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    port = svc["spec"]["ports"][0]["port"]
    uri = f"http://{FULLNAME}-mlflow.{NAMESPACE}.svc.cluster.local:{port}"
    # MLflow rejects unknown Host headers: the service name the pods use must be allowed.
    allowed = env_map(c)["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert f"{FULLNAME}-mlflow.{NAMESPACE}.svc.cluster.local:*" in allowed and "localhost:*" in allowed
    for where, spec in ray_pod_specs(one(default_docs, "RayCluster")["spec"], "RayCluster"):
        assert env_map(spec["containers"][0])["MLFLOW_TRACKING_URI"]["value"] == uri, where


@pytest.mark.e2e
def test_mlflow_backend_uri_from_existing_secret(helm, tmp_path):
    values = write_values(tmp_path, {"mlflow": {"backendStore": {"existingSecret": "mlflow-db",
                                                                 "existingSecretKey": "uri"}}})
    dep = one(render(helm, values), "Deployment", f"{FULLNAME}-mlflow")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert not any(a.startswith("--backend-store-uri") for a in c["args"])
    ref = env_map(c)["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "mlflow-db", "key": "uri"}


@pytest.mark.e2e
def test_notes_explain_dashboard_mlflow_and_job_submission(helm):
    # --dry-run=client renders NOTES.txt without contacting a cluster.
    out = helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", "--set", AMBIENT[0])
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} port-forward svc/{FULLNAME}-head-svc 8265:8265" in notes
    assert f"kubectl -n {NAMESPACE} port-forward svc/{FULLNAME}-mlflow 5000:5000" in notes
    assert ("ray job submit --address http://127.0.0.1:8265 -- archipelago train "
            "--config /etc/archipelago/config.yaml") in notes


# ----------------------------------------------------------------------------------------------------
# 3-island GPU example
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_gpu_example_one_worker_group_per_island(gpu_docs, gpu_values, tmp_path):
    islands = gpu_values["islands"]
    assert len(islands) == 3
    groups = one(gpu_docs, "RayCluster")["spec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == [i["name"] for i in islands]
    assert [g["replicas"] for g in groups] == [i["replicas"] for i in islands]
    cfg = rendered_config(gpu_docs, tmp_path)
    assert cfg.data.num_clusters == 3 and cfg.islands.max_concurrent == 3
    for k, (g, isl) in enumerate(zip(groups, islands)):
        pod = g["template"]["spec"]
        c = pod["containers"][0]
        gpus = isl["resources"]["limits"]["nvidia.com/gpu"]
        assert gpu_limit(c) == gpus
        assert pod["nodeSelector"] == isl["nodeSelector"]
        assert pod["tolerations"] == isl["tolerations"]
        assert pod.get("affinity") == isl.get("affinity")
        resource = "island_" + isl["name"].replace("-", "_")
        assert advertised_resources(g) == {resource: isl["workersPerPod"]}
        # Archipelago side: island k's Ray Train workers request that resource, one GPU each.
        spec = cfg.islands.per_island[k]
        assert spec.resources == {resource: 1}
        assert spec.strategy == isl["strategy"]
        assert spec.num_workers == isl["replicas"] * isl["workersPerPod"]
        assert spec.gpus_per_worker == gpus / isl["workersPerPod"]
        # DS_ACCELERATOR stays unset on GPU pods (DeepSpeed picks CUDA).
        assert "DS_ACCELERATOR" not in env_map(c)
    head = one(gpu_docs, "RayCluster")["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert env_map(head["template"]["spec"]["containers"][0])["DS_ACCELERATOR"]["value"] == "cpu"


@pytest.mark.e2e
def test_gpu_example_credentials_come_from_the_existing_secret(gpu_docs, gpu_values):
    secret = gpu_values["objectStore"]["existingSecret"]
    assert not [d for d in gpu_docs if d["kind"] == "Secret"], "existingSecret given: the chart creates none"
    n = 0
    for where, spec in pod_specs(gpu_docs):
        for c in spec["containers"]:
            env = env_map(c)
            if "AWS_ACCESS_KEY_ID" not in env:
                continue
            n += 1
            for var, key in (("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
                             ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")):
                assert "value" not in env[var], where
                assert env[var]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}, where
            assert env["AWS_ENDPOINT_URL"]["value"] == gpu_values["objectStore"]["endpoint"], where
    assert n >= 5, "head, 3 islands and the MLflow server (S3 artifacts) all need the keys"


# ----------------------------------------------------------------------------------------------------
# Security context
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_every_pod_runs_non_root_with_a_read_only_root_and_writable_tmp(helm, tmp_path):
    values = write_values(tmp_path, {"minio": {"enabled": True},
                                     "objectStore": {"accessKeyId": "minio-user",
                                                     "secretAccessKey": "minio-pass-123"},
                                     "rayJob": {"clusterMode": "own", "shutdownAfterJobFinishes": True}})
    docs = render(helm, GPU_EXAMPLE, values)
    seen = set()
    for where, spec in pod_specs(docs):
        seen.add(where.split("/")[0])
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 1000, where
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, where
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in tmp_volumes, f"{where}: /tmp must be a writable emptyDir"
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["serviceAccountName"] == FULLNAME, where
    assert {"Deployment", "Job", "RayCluster", "RayJob"} <= seen


# ----------------------------------------------------------------------------------------------------
# Cluster modes of the RayJob
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_rayjob_with_its_own_cluster(helm, tmp_path):
    values = write_values(tmp_path, {"ray": {"enabled": False},
                                     "rayJob": {"clusterMode": "own", "shutdownAfterJobFinishes": True,
                                                "ttlSecondsAfterFinished": 300, "activeDeadlineSeconds": 7200,
                                                "backoffLimit": 1, "submitterConfig": {"backoffLimit": 2}}})
    docs = render(helm, GPU_EXAMPLE, values)
    assert not [d for d in docs if d["kind"] == "RayCluster"]
    spec = one(docs, "RayJob")["spec"]
    assert "clusterSelector" not in spec
    assert [g["groupName"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]] == ["h100", "a100", "l4-spot"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 300
    assert spec["activeDeadlineSeconds"] == 7200 and spec["backoffLimit"] == 1
    assert spec["submitterConfig"]["backoffLimit"] == 2


@pytest.mark.e2e
def test_autoscaled_island_trains_on_max_replicas(helm, tmp_path):
    values = write_values(tmp_path, {
        "ray": {"autoscaling": {"enabled": True}},
        "islands": [_island(replicas=0, maxReplicas=3, workersPerPod=2)]})
    docs = render(helm, values)
    (group,) = one(docs, "RayCluster")["spec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (0, 0, 3)
    assert one(docs, "RayCluster")["spec"]["enableInTreeAutoscaling"] is True
    assert rendered_config(docs, tmp_path).islands.per_island[0].num_workers == 6
    # Without the autoscaler an empty island could never train.
    values = write_values(tmp_path, {"islands": [_island(replicas=0)]}, "no-autoscaler.yaml")
    out = template_raw(helm, values)
    assert out.returncode != 0 and "islands[0] (shard-0) has no pods" in out.stderr


@pytest.mark.e2e
def test_shared_cluster_cannot_be_shut_down_by_the_job(helm):
    out = template_raw(helm, sets=("rayJob.shutdownAfterJobFinishes=true",))
    assert out.returncode != 0
    assert "rayJob.shutdownAfterJobFinishes" in out.stderr and "clusterMode=own" in out.stderr


# ----------------------------------------------------------------------------------------------------
# Invalid values fail with the offending field
# ----------------------------------------------------------------------------------------------------

def _island(**over) -> dict:
    return {"name": "shard-0", "replicas": 1, "strategy": "single", **over}


INVALID = {
    "negative-replicas": ({"islands": [_island(replicas=-1)]}, ["/islands/0/replicas", "minimum"]),
    "empty-image-repository": ({"image": {"repository": ""}}, ["/image/repository"]),
    "missing-image-repository": ({"image": {"repository": None}}, ["/image", "repository"]),
    "unknown-strategy": ({"islands": [_island(strategy="zero3")]}, ["/islands/0/strategy", "ddp", "fsdp2"]),
    "bad-island-name": ({"islands": [_island(name="Island_0")]}, ["/islands/0/name"]),
    "gpu-string-typo": ({"islands": [_island(resources={"limits": {"nvidia.com/gpu": "eight"}})]},
                        ["/islands/0/resources/limits/nvidia.com~1gpu"]),
    "unknown-island-key": ({"islands": [_island(replica=2)]}, ["/islands/0", "replica"]),
    "no-islands": ({"islands": []}, ["/islands", "minItems"]),
    "unknown-cluster-mode": ({"rayJob": {"clusterMode": "mine"}}, ["/rayJob/clusterMode"]),
    "unknown-config-section": ({"archipelago": {"config": {"expertz": {}}}},
                               ["/archipelago/config", "expertz"]),
    "duplicate-island": ({"islands": [_island(), _island(strategy="ddp")]}, ["islands[1].name", "shard-0"]),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_invalid_values_fail_with_the_offending_field(helm, tmp_path, case):
    values, expected = INVALID[case]
    out = template_raw(helm, write_values(tmp_path, values))
    assert out.returncode != 0, f"{case}: helm template accepted invalid values"
    for text in expected:
        assert text in out.stderr, f"{case}: {text!r} not in helm's error:\n{out.stderr}"


# ----------------------------------------------------------------------------------------------------
# Secret hygiene
# ----------------------------------------------------------------------------------------------------

ACCESS_KEY = "AKIATESTLEAKCHECK0001"
SECRET_KEY = "s3cr3t-leak-check-9f8e7d6c5b4a"


@pytest.mark.e2e
def test_secret_values_never_leave_the_secret(helm, tmp_path):
    values = write_values(tmp_path, {
        "minio": {"enabled": True},
        "objectStore": {"accessKeyId": ACCESS_KEY, "secretAccessKey": SECRET_KEY},
        "mlflow": {"artifacts": {"destination": "s3://archipelago/mlflow"}},
        "rayJob": {"runtimeEnvYAML": "env_vars:\n  LOG_LEVEL: info\n"},
    })
    out = template_raw(helm, GPU_EXAMPLE, values, sets=("objectStore.existingSecret=",))
    assert out.returncode == 0, out.stderr
    needles = [ACCESS_KEY, SECRET_KEY]
    needles += [base64.b64encode(s.encode()).decode() for s in needles]
    secrets = []
    for raw in raw_documents(out.stdout):
        doc = yaml.safe_load(raw)
        if doc is None:
            continue
        if doc["kind"] == "Secret":
            secrets.append(doc)
            continue
        for needle in needles:
            assert needle not in raw, f"{doc['kind']}/{doc['metadata']['name']} contains a secret value"
    # The chart created exactly one Secret, holding the keys, and every consumer references it.
    (secret,) = secrets
    name = secret["metadata"]["name"]
    assert base64.b64decode(secret["data"]["AWS_ACCESS_KEY_ID"]).decode() == ACCESS_KEY
    assert base64.b64decode(secret["data"]["AWS_SECRET_ACCESS_KEY"]).decode() == SECRET_KEY
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    refs = 0
    for where, spec in pod_specs(docs):
        for c in spec["containers"]:
            for e in c.get("env", []):
                if e["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_USER",
                                 "MINIO_ROOT_PASSWORD"):
                    assert "value" not in e, f"{where}: {e['name']} is an env literal"
                    assert e["valueFrom"]["secretKeyRef"]["name"] == name, where
                    refs += 1
    assert refs >= 2 * 6, "head, 3 islands, MLflow, MinIO and the bucket job read the keys"


@pytest.mark.e2e
def test_existing_secret_wins_over_values(helm, tmp_path):
    keys = {"accessKeyId": "id", "secretAccessKey": "key"}
    values = write_values(tmp_path, {"objectStore": {"existingSecret": "team-s3", "accessKeyId": ACCESS_KEY,
                                                     "secretAccessKey": SECRET_KEY, "secretKeys": keys}})
    out = template_raw(helm, values)
    assert out.returncode == 0, out.stderr
    assert ACCESS_KEY not in out.stdout and SECRET_KEY not in out.stdout
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert not [d for d in docs if d["kind"] == "Secret"]
    head = one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = env_map(head)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "team-s3", "key": "id"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-s3", "key": "key"}


@pytest.mark.e2e
def test_minio_needs_credentials(helm):
    out = template_raw(helm, sets=("minio.enabled=true",))
    assert out.returncode != 0 and "objectStore.existingSecret" in out.stderr
