{{/*
Shared pieces of the Archipelago chart: names, labels, image, security contexts, the common pod
environment (MLflow URI, object store endpoint, credentials via secretKeyRef only), the rendered
archipelago config and the RayCluster spec used by both the RayCluster and a RayJob with its own cluster.
*/}}

{{/* ---------------------------------------------------------------- names & labels */}}

{{- define "archipelago.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or <release> when it already contains the chart name. Kept to 40 characters: KubeRay
derives pod and service names from the RayCluster name, and those must stay valid DNS labels. */}}
{{- define "archipelago.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if not (regexMatch "^[a-z]" .Release.Name) }}
{{- /* KubeRay names RayClusters/RayJobs as DNS-1035 labels (a letter first): release "1st" -> "archipelago-1st". */}}
{{- printf "%s-%s" $name .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "archipelago.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "archipelago.selectorLabels" -}}
app.kubernetes.io/name: {{ include "archipelago.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "archipelago.labels" -}}
helm.sh/chart: {{ include "archipelago.chart" . }}
{{ include "archipelago.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: archipelago
{{- end }}

{{- define "archipelago.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "archipelago.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "archipelago.rayClusterName" -}}
{{- include "archipelago.fullname" . }}
{{- end }}

{{- define "archipelago.configMapName" -}}
{{- printf "%s-config" (include "archipelago.fullname" .) }}
{{- end }}

{{- define "archipelago.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "archipelago.fullname" .) }}
{{- end }}

{{- define "archipelago.minio.fullname" -}}
{{- printf "%s-minio" (include "archipelago.fullname" .) }}
{{- end }}

{{/* ---------------------------------------------------------------- images */}}

{{/* The archipelago image; the tag defaults to the chart's appVersion (= archipelago.__version__). */}}
{{- define "archipelago.image" -}}
{{- $repo := required "image.repository is required (e.g. ghcr.io/archipelago-ml/archipelago)" .Values.image.repository }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "archipelago.mlflow.image" -}}
{{- if .Values.mlflow.image.repository }}
{{- printf "%s:%s" .Values.mlflow.image.repository (default .Chart.AppVersion .Values.mlflow.image.tag) }}
{{- else }}
{{- include "archipelago.image" . }}
{{- end }}
{{- end }}

{{- define "archipelago.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- security */}}

{{- define "archipelago.podSecurityContext" -}}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "archipelago.containerSecurityContext" -}}
{{- with .Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- object store & tracking */}}

{{/* S3 endpoint for pods: explicit objectStore.endpoint, else the bundled MinIO service, else empty. */}}
{{- define "archipelago.objectStore.endpoint" -}}
{{- if .Values.objectStore.endpoint }}
{{- .Values.objectStore.endpoint }}
{{- else if .Values.minio.enabled }}
{{- printf "http://%s.%s.svc.%s:%v" (include "archipelago.minio.fullname" .) .Release.Namespace .Values.clusterDomain .Values.minio.service.port }}
{{- end }}
{{- end }}

{{/* Name of the Secret with the object-store keys; empty when pods get no keys (IRSA / workload identity). */}}
{{- define "archipelago.objectStore.secretName" -}}
{{- if .Values.objectStore.existingSecret }}
{{- .Values.objectStore.existingSecret }}
{{- else if or .Values.objectStore.accessKeyId .Values.objectStore.secretAccessKey }}
{{- printf "%s-object-store" (include "archipelago.fullname" .) }}
{{- end }}
{{- end }}

{{- define "archipelago.mlflow.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc.%s:%v" (include "archipelago.mlflow.fullname" .) .Release.Namespace .Values.clusterDomain .Values.mlflow.service.port }}
{{- else }}
{{- .Values.mlflow.externalTrackingUri }}
{{- end }}
{{- end }}

{{/* AWS_* variables: endpoint and region as plain values (not secrets), keys only through secretKeyRef. */}}
{{- define "archipelago.objectStore.env" -}}
{{- $endpoint := include "archipelago.objectStore.endpoint" . }}
{{- if $endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ $endpoint | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ $endpoint | quote }}
{{- end }}
{{- with .Values.objectStore.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- $secret := include "archipelago.objectStore.secretName" . }}
{{- if $secret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.objectStore.secretKeys.accessKeyId }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.objectStore.secretKeys.secretAccessKey }}
{{- end }}
{{- end }}

{{/*
Environment of every Archipelago container. Call with (dict "root" $ "gpu" <bool> "extra" <list>).
DS_ACCELERATOR=cpu only where the pod has no GPU: on GPU pods DeepSpeed detects CUDA itself.
*/}}
{{- define "archipelago.env" -}}
{{- $root := .root -}}
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- with include "archipelago.mlflow.trackingUri" $root }}
- name: MLFLOW_TRACKING_URI
  value: {{ . | quote }}
{{- end }}
{{- include "archipelago.objectStore.env" $root }}
{{- if not .gpu }}
- name: DS_ACCELERATOR
  value: cpu
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* GPUs requested by a resources block (limits win over requests), as a float. */}}
{{- define "archipelago.gpuCount" -}}
{{- $res := default dict . }}
{{- $limits := default dict $res.limits }}
{{- $requests := default dict $res.requests }}
{{- $gpu := default (index $requests "nvidia.com/gpu") (index $limits "nvidia.com/gpu") }}
{{- default 0 $gpu | float64 }}
{{- end }}

{{/* Worker pods an island trains on: replicas, or maxReplicas when the autoscaler may add pods. */}}
{{- define "archipelago.islandPods" -}}
{{- $isl := .island }}
{{- if and .root.Values.ray.autoscaling.enabled (hasKey $isl "maxReplicas") }}
{{- max (int $isl.replicas) (int $isl.maxReplicas) }}
{{- else }}
{{- int $isl.replicas }}
{{- end }}
{{- end }}

{{/* Custom Ray resource advertised by an island's worker group: island_<name> unless rayResource is set. */}}
{{- define "archipelago.islandResource" -}}
{{- default (printf "island_%s" (.name | replace "-" "_")) .rayResource }}
{{- end }}

{{/* ---------------------------------------------------------------- archipelago config */}}

{{/*
config.yaml for `archipelago train`: .Values.archipelago.config, with (when islandsFromChart) the islands of
the chart written into islands.per_island[k] so that island k's Ray Train workers request the custom
resource of worker group k. Values given explicitly in .Values.archipelago.config win.
*/}}
{{- define "archipelago.config" -}}
{{- $cfg := deepCopy (default dict .Values.archipelago.config) }}
{{- $storage := default dict (get $cfg "storage") }}
{{- if not (get $storage "root") }}
{{- $_ := set $storage "root" (printf "s3://%s/runs" .Values.objectStore.bucket) }}
{{- end }}
{{- $_ := set $cfg "storage" $storage }}
{{- if and .Values.archipelago.islandsFromChart .Values.islands }}
{{- $data := default dict (get $cfg "data") }}
{{- if not (hasKey $data "num_clusters") }}
{{- $_ := set $data "num_clusters" (len .Values.islands) }}
{{- end }}
{{- $_ := set $cfg "data" $data }}
{{- $islands := default dict (get $cfg "islands") }}
{{- if not (hasKey $islands "max_concurrent") }}
{{- $_ := set $islands "max_concurrent" (len .Values.islands) }}
{{- end }}
{{- $perIsland := dict }}
{{- range $k, $isl := .Values.islands }}
{{- $perPod := int (default 1 $isl.workersPerPod) }}
{{- $spec := dict "strategy" $isl.strategy "num_workers" (mul (include "archipelago.islandPods" (dict "root" $ "island" $isl) | int) $perPod) }}
{{- $_ := set $spec "resources" (dict (include "archipelago.islandResource" $isl) 1) }}
{{- $gpu := include "archipelago.gpuCount" $isl.resources | float64 }}
{{- if gt $gpu 0.0 }}
{{- $_ := set $spec "gpus_per_worker" (divf $gpu $perPod) }}
{{- end }}
{{- with $isl.cpusPerWorker }}
{{- $_ := set $spec "cpus_per_worker" . }}
{{- end }}
{{- $_ := set $perIsland (toString $k) $spec }}
{{- end }}
{{- $userPerIsland := default dict (get $islands "per_island") }}
{{- range $k, $spec := $userPerIsland }}
{{- $_ := set $perIsland (toString $k) (merge (deepCopy (default dict $spec)) (default dict (get $perIsland (toString $k)))) }}
{{- end }}
{{- $_ := set $islands "per_island" $perIsland }}
{{- $_ := set $cfg "islands" $islands }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* ---------------------------------------------------------------- Ray pods */}}

{{/* Volumes of Ray pods: writable /tmp, in-memory /dev/shm, the config ConfigMap. */}}
{{- define "archipelago.ray.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.ray.shmSizeLimit }}
- name: archipelago-config
  configMap:
    name: {{ include "archipelago.configMapName" . }}
{{- end }}

{{- define "archipelago.ray.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
- name: archipelago-config
  mountPath: {{ dir .Values.archipelago.configPath }}
  readOnly: true
{{- end }}

{{/*
spec of a RayCluster (also embedded as rayClusterSpec of a RayJob with clusterMode=own): a head group and one
worker group per island, each advertising its island's custom Ray resource through rayStartParams.
*/}}
{{- define "archipelago.rayClusterSpec" -}}
{{- $root := . -}}
rayVersion: {{ .Values.ray.version | quote }}
{{- if .Values.ray.autoscaling.enabled }}
enableInTreeAutoscaling: true
{{- with .Values.ray.autoscaling.options }}
autoscalerOptions:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
headGroupSpec:
  serviceType: {{ .Values.ray.head.serviceType }}
  rayStartParams:
    {{- $headParams := merge (dict) (default dict .Values.ray.head.rayStartParams) (dict "dashboard-host" "0.0.0.0") }}
    {{- range $k, $v := $headParams }}
    {{ $k }}: {{ toString $v | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "archipelago.labels" . | nindent 8 }}
        app.kubernetes.io/component: ray-head
        {{- with .Values.ray.head.labels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.ray.head.annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "archipelago.serviceAccountName" . }}
      {{- /* KubeRay's autoscaler sidecar runs in this pod and talks to the API server with this service
      account's token; the operator binds its Role (pods, rayclusters) to this account. */}}
      automountServiceAccountToken: {{ or .Values.serviceAccount.automountServiceAccountToken .Values.ray.autoscaling.enabled }}
      {{- with (default .Values.priorityClassName .Values.ray.head.priorityClassName) }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with include "archipelago.imagePullSecrets" . }}{{ . | trim | nindent 6 }}{{ end }}
      {{- with include "archipelago.podSecurityContext" . }}{{ . | trim | nindent 6 }}{{ end }}
      {{- with .Values.ray.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.ray.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.ray.head.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ include "archipelago.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          ports:
            - name: gcs
              containerPort: 6379
            - name: dashboard
              containerPort: 8265
            - name: client
              containerPort: 10001
            - name: metrics
              containerPort: 8080
            {{- with .servePort }}
            - name: serve
              containerPort: {{ . }}
            {{- end }}
          env:
            {{- include "archipelago.env" (dict "root" . "gpu" (gt (include "archipelago.gpuCount" .Values.ray.head.resources | float64) 0.0)) | nindent 12 }}
          {{- with .Values.ray.head.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with include "archipelago.containerSecurityContext" . }}{{ . | trim | nindent 10 }}{{ end }}
          volumeMounts:
            {{- include "archipelago.ray.volumeMounts" . | nindent 12 }}
      volumes:
        {{- include "archipelago.ray.volumes" . | nindent 8 }}
workerGroupSpecs:
{{- range $k, $isl := .Values.islands }}
{{- $gpu := include "archipelago.gpuCount" $isl.resources | float64 }}
{{- $perPod := int (default 1 $isl.workersPerPod) }}
{{- $rayResources := merge (dict (include "archipelago.islandResource" $isl) $perPod) (default dict $isl.rayResources) }}
  - groupName: {{ $isl.name }}
    replicas: {{ $isl.replicas }}
    minReplicas: {{ hasKey $isl "minReplicas" | ternary $isl.minReplicas $isl.replicas }}
    maxReplicas: {{ hasKey $isl "maxReplicas" | ternary $isl.maxReplicas $isl.replicas }}
    rayStartParams:
      {{- range $pk, $pv := (default dict $isl.rayStartParams) }}
      {{ $pk }}: {{ toString $pv | quote }}
      {{- end }}
      # ray start --resources: KubeRay passes the value verbatim to the shell, hence the inner quotes.
      resources: {{ printf "\"%s\"" (toJson $rayResources | replace "\"" "\\\"") | squote }}
    template:
      metadata:
        labels:
          {{- include "archipelago.labels" $root | nindent 10 }}
          app.kubernetes.io/component: ray-worker
          archipelago.dev/island: {{ $isl.name }}
          archipelago.dev/shard: {{ $k | quote }}
          {{- with $isl.labels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        {{- with $isl.annotations }}
        annotations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
      spec:
        serviceAccountName: {{ include "archipelago.serviceAccountName" $root }}
        automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
        {{- with (default $root.Values.priorityClassName $isl.priorityClassName) }}
        priorityClassName: {{ . }}
        {{- end }}
        {{- with include "archipelago.imagePullSecrets" $root }}{{ . | trim | nindent 8 }}{{ end }}
        {{- with include "archipelago.podSecurityContext" $root }}{{ . | trim | nindent 8 }}{{ end }}
        {{- with $isl.nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $isl.tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $isl.affinity }}
        affinity:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        containers:
          - name: ray-worker
            image: {{ include "archipelago.image" $root }}
            imagePullPolicy: {{ $root.Values.image.pullPolicy }}
            env:
              - name: ARCHIPELAGO_ISLAND
                value: {{ $isl.name | quote }}
              - name: ARCHIPELAGO_SHARD
                value: {{ $k | quote }}
              {{- include "archipelago.env" (dict "root" $root "gpu" (gt $gpu 0.0) "extra" $isl.env) | nindent 14 }}
            {{- with $isl.resources }}
            resources:
              {{- toYaml . | nindent 14 }}
            {{- end }}
            {{- with include "archipelago.containerSecurityContext" $root }}{{ . | trim | nindent 12 }}{{ end }}
            volumeMounts:
              {{- include "archipelago.ray.volumeMounts" $root | nindent 14 }}
        volumes:
          {{- include "archipelago.ray.volumes" $root | nindent 10 }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- checks */}}

{{/* Cross-field rules that values.schema.json cannot express with a readable message. */}}
{{- define "archipelago.validate" -}}
{{- $seen := dict }}
{{- $resources := dict }}
{{- range $i, $isl := .Values.islands }}
{{- if hasKey $seen $isl.name }}
{{- fail (printf "islands[%d].name %q is used twice: worker group names must be unique" $i $isl.name) }}
{{- end }}
{{- $_ := set $seen $isl.name true }}
{{- if hasKey (default dict $isl.rayStartParams) "resources" }}
{{- fail (printf "islands[%d].rayStartParams.resources: the chart sets it (island resource); add custom resources with islands[%d].rayResources" $i $i) }}
{{- end }}
{{- $res := include "archipelago.islandResource" $isl }}
{{- if hasKey $resources $res }}
{{- fail (printf "islands[%d]: Ray resource %q is already advertised by another island; set islands[%d].rayResource" $i $res $i) }}
{{- end }}
{{- $_ := set $resources $res true }}
{{- if and $.Values.archipelago.islandsFromChart (eq (include "archipelago.islandPods" (dict "root" $ "island" $isl)) "0") }}
{{- fail (printf "islands[%d] (%s) has no pods to train on: set replicas >= 1, or ray.autoscaling.enabled=true with maxReplicas >= 1" $i $isl.name) }}
{{- end }}
{{- if and (hasKey $isl "minReplicas") (gt (int $isl.minReplicas) (int $isl.replicas)) }}
{{- fail (printf "islands[%d] (%s): minReplicas (%v) must be <= replicas (%v)" $i $isl.name $isl.minReplicas $isl.replicas) }}
{{- end }}
{{- if and (hasKey $isl "maxReplicas") (lt (int $isl.maxReplicas) (int $isl.replicas)) }}
{{- fail (printf "islands[%d] (%s): maxReplicas (%v) must be >= replicas (%v)" $i $isl.name $isl.maxReplicas $isl.replicas) }}
{{- end }}
{{- end }}
{{- if .Values.rayJob.enabled }}
{{- if eq .Values.rayJob.clusterMode "shared" }}
{{- if and (not .Values.ray.enabled) (not .Values.rayJob.clusterName) }}
{{- fail "rayJob.clusterMode=shared submits to the chart's RayCluster: set ray.enabled=true, rayJob.clusterName=<existing RayCluster>, or rayJob.clusterMode=own" }}
{{- end }}
{{- if .Values.rayJob.shutdownAfterJobFinishes }}
{{- fail "rayJob.shutdownAfterJobFinishes=true needs rayJob.clusterMode=own: a job never tears down the shared RayCluster" }}
{{- end }}
{{- if .Values.rayJob.suspend }}
{{- fail "rayJob.suspend=true needs rayJob.clusterMode=own (KubeRay cannot suspend a job on a shared cluster)" }}
{{- end }}
{{- if gt (int .Values.rayJob.backoffLimit) 0 }}
{{- fail (printf "rayJob.backoffLimit=%v needs rayJob.clusterMode=own: KubeRay >= 1.6 rejects retries on a shared cluster (clusterSelector) and older versions delete that cluster on retry" .Values.rayJob.backoffLimit) }}
{{- end }}
{{- end }}
{{- if and .Values.rayJob.suspend (not .Values.rayJob.shutdownAfterJobFinishes) }}
{{- fail "rayJob.suspend=true needs rayJob.shutdownAfterJobFinishes=true (KubeRay rule)" }}
{{- end }}
{{- if and (gt (int .Values.rayJob.ttlSecondsAfterFinished) 0) (not .Values.rayJob.shutdownAfterJobFinishes) }}
{{- fail "rayJob.ttlSecondsAfterFinished needs rayJob.shutdownAfterJobFinishes=true (KubeRay rule)" }}
{{- end }}
{{- end }}
{{- if and .Values.mlflow.enabled (not .Values.mlflow.artifacts.serve) (not .Values.mlflow.artifacts.destination) }}
{{- fail "mlflow.artifacts.serve=false needs mlflow.artifacts.destination (e.g. s3://archipelago/mlflow): clients then write there directly" }}
{{- end }}
{{- if and .Values.minio.enabled (not (include "archipelago.objectStore.secretName" .)) }}
{{- fail "minio.enabled=true needs credentials: set objectStore.existingSecret (keys objectStore.secretKeys.*) or objectStore.accessKeyId/secretAccessKey" }}
{{- end }}
{{- $cfgDir := dir .Values.archipelago.configPath }}
{{- if has $cfgDir (list "/" "/tmp" "/dev" "/dev/shm") }}
{{- fail (printf "archipelago.configPath=%s: its directory %s is a mount the chart already makes (or the root); put the config in a directory of its own, e.g. /etc/archipelago/config.yaml" .Values.archipelago.configPath $cfgDir) }}
{{- end }}
{{- range $what, $m := dict "ray.labels" .Values.ray.labels "rayJob.labels" .Values.rayJob.labels }}
{{- range $k, $_ := $m }}
{{- if or (hasPrefix "app.kubernetes.io/" $k) (hasPrefix "helm.sh/" $k) (hasPrefix "ray.io/" $k) }}
{{- fail (printf "%s: %q is set by the chart or KubeRay; choose another key" $what $k) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (not .Values.objectStore.existingSecret) (or .Values.objectStore.accessKeyId .Values.objectStore.secretAccessKey) (not (and .Values.objectStore.accessKeyId .Values.objectStore.secretAccessKey)) }}
{{- fail "objectStore.accessKeyId and objectStore.secretAccessKey must be set together (or use objectStore.existingSecret)" }}
{{- end }}
{{- include "archipelago.validateStorageAccess" . }}
{{- end }}

{{/*
A cluster whose pods cannot reach storage.root would pull images, start the RayJob and fail at the first
shard write minutes later; and `helm template | kubectl apply` or GitOps tools never show NOTES.txt. So an
s3:// root with no credential source at all fails here, naming the ways to give pods credentials.
*/}}
{{- define "archipelago.validateStorageAccess" -}}
{{- $root := (include "archipelago.config" . | fromYaml).storage.root }}
{{- $envNames := list }}
{{- range .Values.extraEnv }}{{- $envNames = append $envNames .name }}{{- end }}
{{- $fromEnv := or (has "AWS_ACCESS_KEY_ID" $envNames) (has "AWS_WEB_IDENTITY_TOKEN_FILE" $envNames) (has "AWS_ROLE_ARN" $envNames) }}
{{- $credentials := or (include "archipelago.objectStore.secretName" .) .Values.objectStore.ambientCredentials .Values.serviceAccount.annotations $fromEnv }}
{{- if and (hasPrefix "s3://" $root) (not $credentials) }}
{{- fail (printf "storage.root %s: pods get no S3 credentials, so training cannot write there. Set objectStore.existingSecret (a Secret with the keys), or minio.enabled=true with objectStore.existingSecret for a trial, or objectStore.ambientCredentials=true when pods get credentials from IRSA / workload identity / the node" $root) }}
{{- end }}
{{- end }}
