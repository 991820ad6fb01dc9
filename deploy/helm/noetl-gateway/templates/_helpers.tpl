{{/* The chart's name, overridable. */}}
{{- define "noetl-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the prefix of every object (≤ 54 so "-internal" fits 63). */}}
{{- define "noetl-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The internal Service's name. */}}
{{- define "noetl-gateway.internalName" -}}
{{- printf "%s-internal" (include "noetl-gateway.fullname" .) }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "noetl-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "noetl-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: noetl
{{- end }}

{{/* The pods' identity: Services, the PDB and the NetworkPolicy select on these. */}}
{{- define "noetl-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "noetl-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "noetl-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "noetl-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is set. */}}
{{- define "noetl-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the kubelet counts it from the start of preStop, so it must
cover the preStop sleep, then DRAIN_DELAY (readiness failed, listeners open), then
SHUTDOWN_GRACE (streams ended spread over it), plus a margin before SIGKILL.
*/}}
{{- define "noetl-gateway.terminationGracePeriodSeconds" -}}
{{- $d := .Values.drain }}
{{- add $d.preStopSleepSeconds $d.delaySeconds $d.shutdownGraceSeconds $d.marginSeconds }}
{{- end }}

{{/* The in-cluster URL NoETL's workers call back on (the internal Service). */}}
{{- define "noetl-gateway.callbackUrl" -}}
{{- printf "http://%s.%s.svc.cluster.local:%v" (include "noetl-gateway.internalName" .) .Release.Namespace .Values.service.internal.port }}
{{- end }}
