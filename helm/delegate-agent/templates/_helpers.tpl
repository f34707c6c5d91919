{{- define "delegate-agent.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "delegate-agent.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "delegate-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "delegate-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "delegate-agent.labels" -}}
{{ include "delegate-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "delegate-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "delegate-agent.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "delegate-agent.tokenSecret" -}}
{{- default (printf "%s-token" (include "delegate-agent.fullname" .)) .Values.token.existingSecret -}}
{{- end -}}

{{- define "delegate-agent.autoscaled" -}}
{{- if or .Values.autoscaling.enabled .Values.keda.enabled -}}true{{- end -}}
{{- end -}}

{{- define "delegate-agent.serviceMonitor" -}}
{{- $sm := .Values.metrics.serviceMonitor.enabled -}}
{{- if or (eq (toString $sm) "true") (and (eq (toString $sm) "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}true{{- end -}}
{{- end -}}

{{- define "delegate-agent.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "delegate-agent.delegateName" -}}
{{- default (include "delegate-agent.fullname" .) .Values.delegate.name -}}
{{- end -}}
