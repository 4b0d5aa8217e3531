{{/* Names and labels ------------------------------------------------------------------ */}}

{{- define "baton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The RayCluster's name, also the prefix of every object (a DNS-1035 label: KubeRay
     names the head Service "<name>-head-svc", so keep room for the suffix). */}}
{{- define "baton.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "baton.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "baton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of one role's pods: the release's, plus the Baton role. */}}
{{- define "baton.roleSelectorLabels" -}}
{{ include "baton.selectorLabels" .root }}
baton.io/role: {{ .role }}
{{- end }}

{{- define "baton.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "baton.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "baton.image" -}}
{{- $flavor := ternary "cpu" "cuda" (eq .Values.accelerator.type "cpu") }}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $flavor) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* GPUs of one pod of a role: tensor x pipeline, the only place a GPU count is made.
     Called with (dict "root" $ "spec" .Values.prefill). */}}
{{- define "baton.gpus" -}}
{{- if eq .root.Values.accelerator.type "cpu" }}0{{ else }}{{ mul (int .spec.parallelism.tensor) (int .spec.parallelism.pipeline) }}{{ end }}
{{- end }}

{{/* Validation: impossible combinations fail the render, naming the key and the reason.
     (values.schema.json catches types, ranges and misspelt keys before this runs.) */}}
{{- define "baton.validate" -}}
{{- $v := .Values }}
{{- if and $v.ray.auth.enabled (not (semverCompare ">=2.52.0-0" $v.ray.version)) }}
{{- fail (printf "ray.version: Ray token authentication (ray.auth.enabled) needs Ray >= 2.52, got %q" $v.ray.version) }}
{{- end }}
{{- $arch := $v.model.architecture }}
{{- range $role := list "prefill" "decode" }}
{{- $spec := index $v $role }}
{{- $tp := int $spec.parallelism.tensor }}
{{- $pp := int $spec.parallelism.pipeline }}
{{- if ne 0 (mod (int $arch.numHeads) $tp) }}
{{- fail (printf "%s.parallelism.tensor: must divide model.architecture.numHeads=%d, got %d" $role (int $arch.numHeads) $tp) }}
{{- end }}
{{- $kv := int $arch.numKeyValueHeads }}
{{- if and (ne 0 (mod $kv $tp)) (ne 0 (mod $tp $kv)) }}
{{- fail (printf "%s.parallelism.tensor: must divide model.architecture.numKeyValueHeads=%d or be a multiple of it, got %d" $role $kv $tp) }}
{{- end }}
{{- if gt $pp (int $arch.numLayers) }}
{{- fail (printf "%s.parallelism.pipeline: must be at most model.architecture.numLayers=%d, got %d" $role (int $arch.numLayers) $pp) }}
{{- end }}
{{- if and (ne $v.accelerator.type "cpu") (gt (mul $tp $pp) (int $v.accelerator.gpusPerNode)) }}
{{- fail (printf "%s.parallelism: tensor x pipeline = %d GPUs do not fit one node (accelerator.gpusPerNode=%d); one instance is one pod" $role (mul $tp $pp) (int $v.accelerator.gpusPerNode)) }}
{{- end }}
{{- $limit := int (include "baton.millicpu" $spec.resources.limits.cpu) }}
{{- $need := int (mulf $v.ray.cpusPerRank 1000 $tp $pp) }}
{{- if lt $limit $need }}
{{- fail (printf "%s.resources.limits.cpu: %v CPUs cannot hold tensor x pipeline = %d ranks of ray.cpusPerRank=%v CPUs each" $role $spec.resources.limits.cpu (mul $tp $pp) $v.ray.cpusPerRank) }}
{{- end }}
{{- end }}
{{- range $name := list "apiKey" "adminKey" }}
{{- $k := index $v.auth $name }}
{{- if and $k.enabled (not $k.existingSecret) }}
{{- fail (printf "auth.%s.existingSecret: required when auth.%s.enabled is true (the chart takes secrets by reference only)" $name $name) }}
{{- end }}
{{- end }}
{{- if and (eq $v.model.source "pvc") (not $v.model.pvc.existingClaim) }}
{{- fail "model.pvc.existingClaim: required when model.source is pvc (a ReadWriteMany claim holding the model)" }}
{{- end }}
{{- if eq $v.model.source "init" }}
{{- if not $v.model.init.command }}
{{- fail "model.init.command: required when model.source is init (the command that writes the model under model.mountPath)" }}
{{- end }}
{{- if not $v.model.path }}
{{- fail "model.path: required when model.source is init (where under model.mountPath the init step puts the model)" }}
{{- end }}
{{- end }}
{{- if and (eq $v.model.source "pvc") (not $v.model.path) }}
{{- fail "model.path: required when model.source is pvc (the model's directory or .gguf file in the claim)" }}
{{- end }}
{{- if and $v.router.ingress.enabled (not $v.router.ingress.host) }}
{{- fail "router.ingress.host: required when router.ingress.enabled is true" }}
{{- end }}
{{- end }}

{{/* A CPU quantity ("2", "0.5", "1500m", 2) in millicores. */}}
{{- define "baton.millicpu" -}}
{{- $q := toString . }}
{{- if hasSuffix "m" $q }}{{ trimSuffix "m" $q | int }}{{ else }}{{ mulf (float64 $q) 1000 | int }}{{ end }}
{{- end }}

{{/* The model id clients use, as router/service.py's served_model_name derives it. */}}
{{- define "baton.servedName" -}}
{{- if .Values.model.servedName }}{{ .Values.model.servedName }}
{{- else if .Values.model.path }}
{{- $n := base (clean .Values.model.path) }}
{{- if hasSuffix ".gguf" $n }}{{ first (splitList "." (trimSuffix ".gguf" $n)) }}{{ else }}{{ $n }}{{ end }}
{{- else }}SmolLM2-135M-Instruct
{{- end }}
{{- end }}

{{/* The --model argument: where the model is inside the container. */}}
{{- define "baton.modelPath" -}}
{{- if eq .Values.model.source "image" }}{{ .Values.model.path }}
{{- else }}{{ printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.path) }}
{{- end }}
{{- end }}

{{/* Security ---------------------------------------------------------------------------- */}}

{{- define "baton.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "baton.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Environment of every Ray container (head and workers). */}}
{{- define "baton.rayEnv" -}}
- name: BATON_HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: BATON_LOG_LEVEL
  value: {{ .Values.router.logLevel | quote }}
- name: HOME
  value: /tmp
- name: BATON_CACHE_DIR
  value: /tmp/baton-cache
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ default (include "baton.fullname" .) .Values.ray.auth.existingSecret }}
      key: auth_token
{{- end }}
{{- end }}

{{/* Volumes: writable /tmp, memory-backed /dev/shm (size per role), the model. */}}
{{- define "baton.volumes" -}}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- $m := .root.Values.model }}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $m.pvc.existingClaim }}
    readOnly: {{ $m.pvc.readOnly }}
{{- else if eq $m.source "init" }}
- name: model
  emptyDir:
    sizeLimit: {{ $m.init.sizeLimit }}
{{- end }}
{{- end }}

{{- define "baton.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- $m := .Values.model }}
{{- if eq $m.source "pvc" }}
- name: model
  mountPath: {{ $m.mountPath }}
  readOnly: {{ $m.pvc.readOnly }}
  {{- with $m.pvc.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- else if eq $m.source "init" }}
- name: model
  mountPath: {{ $m.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The init step that fetches the model into the pod's model volume. */}}
{{- define "baton.initContainers" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "init" }}
initContainers:
  - name: fetch-model
    image: {{ default (include "baton.image" .) $m.init.image }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: {{ toJson $m.init.command }}
    env:
      - name: HOME
        value: /tmp
      - name: HF_HUB_DISABLE_TELEMETRY
        value: "1"
      {{- if $m.hubToken.existingSecret }}
      - name: HF_TOKEN
        valueFrom:
          secretKeyRef:
            name: {{ $m.hubToken.existingSecret }}
            key: {{ $m.hubToken.key }}
      {{- end }}
    resources:
      requests: {cpu: 500m, memory: 1Gi}
      limits: {cpu: "1", memory: 2Gi}
    securityContext:
      {{- include "baton.containerSecurityContext" . | nindent 6 }}
    volumeMounts:
      - name: tmp
        mountPath: /tmp
      - name: model
        mountPath: {{ $m.mountPath }}
{{- end }}
{{- end }}

{{/* Ray start parameters of the head, in `ray start` flag form (KubeRay's convention:
     "true" is a bare flag). The same map is the head group's rayStartParams. */}}
{{- define "baton.headStartParams" -}}
dashboard-agent-listen-port: {{ .Values.ray.agentPort | quote }}
dashboard-host: "127.0.0.1"
dashboard-port: {{ .Values.ray.dashboardPort | quote }}
disable-usage-stats: "true"
metrics-export-port: {{ .Values.ray.metricsPort | quote }}
num-cpus: "0"
num-gpus: "0"
port: {{ .Values.ray.gcsPort | quote }}
temp-dir: /tmp/ray
{{- end }}
