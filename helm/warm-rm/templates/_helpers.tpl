{{/* The chart name, overridable. */}}
{{- define "warm-rm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's object name: <release>-<chart> unless the release already contains it. */}}
{{- define "warm-rm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "warm-rm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "warm-rm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "warm-rm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "warm-rm.labels" -}}
helm.sh/chart: {{ include "warm-rm.chart" . }}
{{ include "warm-rm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: reward-model
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "warm-rm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "warm-rm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* <repository>:<tag>, the tag defaulting to <appVersion>-cpu or <appVersion>-gpu. */}}
{{- define "warm-rm.image" -}}
{{- $flavour := ternary "gpu" "cpu" .Values.gpu.enabled }}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $flavour) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The model directory inside the container: WARM_MODEL. */}}
{{- define "warm-rm.modelPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) .Values.model.dir }}
{{- end }}

{{- define "warm-rm.claimName" -}}
{{- default (printf "%s-model" (include "warm-rm.fullname" .)) .Values.model.pvc.existingClaim }}
{{- end }}

{{/* The Secret holding the API keys (a JSON list), or "" when auth is off. */}}
{{- define "warm-rm.apiKeysSecret" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else if .Values.auth.apiKeys }}
{{- printf "%s-auth" (include "warm-rm.fullname" .) }}
{{- end }}
{{- end }}

{{- define "warm-rm.apiKeysEnv" -}}
{{- $secret := include "warm-rm.apiKeysSecret" . }}
{{- if $secret }}
- name: WARM_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.auth.existingSecretKey }}
{{- end }}
{{- end }}

{{/* Seconds Kubernetes waits after preStop starts: the preStop sleep, the drain, a margin. */}}
{{- define "warm-rm.terminationGracePeriod" -}}
{{- add .Values.shutdown.preStopSeconds .Values.shutdown.drainSeconds .Values.shutdown.marginSeconds }}
{{- end }}

{{/* A settings value as an env string: JSON for numbers and booleans (no 1e+06 forms). */}}
{{- define "warm-rm.envValue" -}}
{{- if kindIs "string" . }}{{ . | quote }}{{ else }}{{ toJson . | quote }}{{ end }}
{{- end }}

{{/* The Prometheus selector for this release's pods. */}}
{{- define "warm-rm.promSelector" -}}
namespace="{{ .Release.Namespace }}", service="{{ include "warm-rm.fullname" . }}"
{{- end }}
