{{/* Names and labels shared by every object of a release. */}}
{{- define "fedfusion.fullname" -}}
{{- printf "%s-fedfusion" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fedfusion.labels" -}}
app.kubernetes.io/name: fedfusion
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fedfusion.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end -}}

{{- define "fedfusion.siteKitSecret" -}}
{{- if .Values.site.kit.existingSecret -}}
{{ .Values.site.kit.existingSecret }}
{{- else -}}
{{ include "fedfusion.fullname" . }}-site-kit
{{- end -}}
{{- end -}}
