{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "extractedprism.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "extractedprism.fullname" -}}
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

{{- define "extractedprism.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "extractedprism.selectorLabels" -}}
app.kubernetes.io/name: {{ include "extractedprism.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "extractedprism.labels" -}}
helm.sh/chart: {{ include "extractedprism.chart" . }}
{{ include "extractedprism.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "extractedprism.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "extractedprism.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "extractedprism.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The static endpoints as one comma-separated string without blanks; the value
may be such a string or a list.
*/}}
{{- define "extractedprism.endpoints" -}}
{{- $eps := list }}
{{- $v := .Values.endpoints | default "" }}
{{- $items := ternary $v (splitList "," (toString $v)) (kindIs "slice" $v) }}
{{- range $items }}
{{- $e := trim (toString .) }}
{{- if $e }}{{ $eps = append $eps $e }}{{ end }}
{{- end }}
{{- join "," $eps }}
{{- end }}

{{/* The discovery switch in force: the enableDiscovery flag, else config. */}}
{{- define "extractedprism.discoveryEnabled" -}}
{{- if kindIs "bool" .Values.enableDiscovery }}
{{- ternary "true" "" .Values.enableDiscovery }}
{{- else }}
{{- ternary "true" "" (dig "discovery" "enabled" false .Values.config | toString | eq "true") }}
{{- end }}
{{- end }}

{{/* Namespace of the service whose EndpointSlices discovery watches. */}}
{{- define "extractedprism.discoveryNamespace" -}}
{{- dig "discovery" "namespace" "default" .Values.config }}
{{- end }}

{{/* The listener address in force (flag, then config, then the daemon's default). */}}
{{- define "extractedprism.listenAddress" -}}
{{- .Values.bindAddress | default (dig "listen" "address" "127.0.0.1" .Values.config) | toString | trimPrefix "[" | trimSuffix "]" }}
{{- end }}

{{/*
The health server address in force (flag, then config, then the daemon's
default 127.0.0.1, whatever the listener's address).
*/}}
{{- define "extractedprism.healthAddress" -}}
{{- .Values.healthBindAddress | default (dig "admin" "address" "" .Values.config) | default "127.0.0.1" | toString | trimPrefix "[" | trimSuffix "]" }}
{{- end }}

{{/* "true" when the address given is loopback (127.0.0.0/8, ::1, localhost). */}}
{{- define "extractedprism.isLoopback" -}}
{{- if or (hasPrefix "127." .) (eq . "::1") (eq . "localhost") }}true{{ end }}
{{- end }}

{{/* The host kubelet probes: the health address, with wildcards mapped to loopback. */}}
{{- define "extractedprism.probeHost" -}}
{{- $a := include "extractedprism.healthAddress" . }}
{{- if eq $a "0.0.0.0" }}127.0.0.1{{ else if eq $a "::" }}::1{{ else }}{{ $a }}{{ end }}
{{- end }}

{{/* The health port in force. */}}
{{- define "extractedprism.healthPort" -}}
{{- .Values.healthPort | default (dig "admin" "port" 7446 .Values.config) | int }}
{{- end }}

{{/* True when the health server listens on loopback only. */}}
{{- define "extractedprism.healthLoopback" -}}
{{- include "extractedprism.isLoopback" (include "extractedprism.healthAddress" .) }}
{{- end }}

{{/*
Whole seconds (rounded up) of a Go duration string such as "30s", "1m30s" or "500ms".
*/}}
{{- define "extractedprism.durationSeconds" -}}
{{- $total := 0.0 }}
{{- $units := dict "h" 3600.0 "m" 60.0 "s" 1.0 "ms" 0.001 "us" 0.000001 "µs" 0.000001 "ns" 0.000000001 }}
{{- range regexFindAll "[0-9.]+(ns|us|µs|ms|s|m|h)" (toString .) -1 }}
{{- $n := regexReplaceAll "[a-zµ]+$" . "" | float64 }}
{{- $u := regexReplaceAll "^[0-9.]+" . "" }}
{{- $total = addf $total (mulf $n (get $units $u)) }}
{{- end }}
{{- ceil $total | int }}
{{- end }}

{{/* Seconds kubelet waits for the drain before SIGKILL. */}}
{{- define "extractedprism.terminationGracePeriodSeconds" -}}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) }}
{{- .Values.terminationGracePeriodSeconds | int }}
{{- else }}
{{- $drain := include "extractedprism.durationSeconds" (dig "proxy" "drain_timeout" "30s" .Values.config) | int }}
{{- add (.Values.preStopSleepSeconds | int) $drain 10 }}
{{- end }}
{{- end }}

{{/*
A probe with the health address and port filled into httpGet where the
values leave them out.
*/}}
{{- define "extractedprism.probe" -}}
{{- $probe := deepCopy .probe }}
{{- if $probe.httpGet }}
{{- $get := $probe.httpGet }}
{{- if not $get.host }}{{ $_ := set $get "host" (include "extractedprism.probeHost" .root) }}{{ end }}
{{- if not $get.port }}{{ $_ := set $get "port" (include "extractedprism.healthPort" .root | int) }}{{ end }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/*
The value a probe duration has in the daemon: the flag value if set, else
the key under config, else the daemon's default. Returns YAML with name
(the value's name), text and ns (nanoseconds, a float; 0 if the text is
not a Go duration, which the schema or the daemon reports).
*/}}
{{- define "extractedprism.effectiveDuration" -}}
{{- $name := .flag }}{{ $text := toString .value }}
{{- if not .value }}
{{- $name = printf "config.%s" .key }}{{ $text = toString .config }}
{{- if not .config }}{{ $name = printf "%s (default)" .flag }}{{ $text = .default }}{{ end }}
{{- end }}
{{- $units := dict "ns" 1.0 "us" 1000.0 "µs" 1000.0 "ms" 1000000.0 "s" 1000000000.0 "m" 60000000000.0 "h" 3600000000000.0 }}
{{- $ns := 0.0 }}
{{- if regexMatch "^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$" $text }}
{{- range $part := regexFindAll "[0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h)" $text -1 }}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $part }}
{{- $ns = addf $ns (mulf (float64 $num) (get $units (trimPrefix $num $part))) }}
{{- end }}
{{- end }}
name: {{ $name | quote }}
text: {{ $text | quote }}
ns: {{ $ns }}
{{- end }}

{{/*
Checks that the schema cannot express; each failure names the value and
says what is expected.
*/}}
{{- define "extractedprism.validate" -}}
{{- $static := include "extractedprism.endpoints" . }}
{{- $fromConfig := dig "endpoints" (list) .Values.config }}
{{- if and (not $static) (not $fromConfig) }}
{{- fail "endpoints is required: set endpoints to the API servers as a comma-separated host:port list, e.g. --set endpoints='10.0.0.1:6443\\,10.0.0.2:6443' or --set endpoints='{10.0.0.1:6443,10.0.0.2:6443}' (or list them under config.endpoints)" }}
{{- end }}
{{- range $ep := ternary (splitList "," $static) (list) (ne $static "") }}
{{- if not (regexMatch "^(\\[[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?\\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):[0-9]{1,5}$" $ep) }}
{{- fail (printf "endpoints: %q is not host:port (IPv6 as [fd00::1]:6443), in endpoints=%q" $ep $static) }}
{{- end }}
{{- $port := regexReplaceAll "^.*:" $ep "" | int }}
{{- if or (lt $port 1) (gt $port 65535) }}
{{- fail (printf "endpoints: port %d of %q is out of range 1-65535" $port $ep) }}
{{- end }}
{{- end }}
{{- $interval := include "extractedprism.effectiveDuration" (dict "flag" "healthInterval" "value" .Values.healthInterval "key" "probe.interval" "config" (dig "probe" "interval" "" .Values.config) "default" "2s") | fromYaml }}
{{- $timeout := include "extractedprism.effectiveDuration" (dict "flag" "healthTimeout" "value" .Values.healthTimeout "key" "probe.timeout" "config" (dig "probe" "timeout" "" .Values.config) "default" "2s") | fromYaml }}
{{- if and $interval.ns $timeout.ns (gt (float64 $timeout.ns) (float64 $interval.ns)) }}
{{- fail (printf "%s=%s exceeds %s=%s: a health check must end before the next one is due (the daemon refuses this pair at start, so every pod would crash-loop); set %s to at most %s" $timeout.name $timeout.text $interval.name $interval.text $timeout.name $interval.text) }}
{{- end }}
{{- if and .Values.bindPort .Values.healthPort (eq (.Values.bindPort | int) (.Values.healthPort | int)) }}
{{- fail (printf "healthPort %d must differ from bindPort %d" (.Values.healthPort | int) (.Values.bindPort | int)) }}
{{- end }}
{{- if eq .Values.updateStrategy.type "RollingUpdate" }}
{{- $surge := toString (.Values.updateStrategy.maxSurge | default 0) }}
{{- $unavail := toString (.Values.updateStrategy.maxUnavailable | default 0) }}
{{- if and (ne $surge "0") (ne $surge "0%") (ne $unavail "0") (ne $unavail "0%") }}
{{- fail (printf "updateStrategy.maxSurge=%s needs updateStrategy.maxUnavailable=0 (got %s): the surged pod takes over before the old one stops, so no node needs to be without one" $surge $unavail) }}
{{- end }}
{{- if and (ne $surge "0") (ne $surge "0%") (eq (include "extractedprism.reusePort" .) "false") }}
{{- fail (printf "updateStrategy.maxSurge=%s needs reusePort (got false): the surged pod binds the ports next to the old one, which the kernel allows only with SO_REUSEPORT; leave reusePort null" $surge) }}
{{- end }}
{{- if and (or (eq $surge "0") (eq $surge "0%")) (or (eq $unavail "0") (eq $unavail "0%")) }}
{{- fail "updateStrategy.maxUnavailable and updateStrategy.maxSurge cannot both be 0: set maxSurge=1 with maxUnavailable=0, or maxUnavailable=1" }}
{{- end }}
{{- end }}
{{- if and (or .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled) (include "extractedprism.healthLoopback" .) }}
{{- fail (printf "metrics: Prometheus cannot scrape %s:%s from outside the node: set healthBindAddress=0.0.0.0 (or the node address) and allowNonLoopbackBind=true to enable the ServiceMonitor or PodMonitor" (include "extractedprism.healthAddress" .) (include "extractedprism.healthPort" .)) }}
{{- end }}
{{- if not .Values.allowNonLoopbackBind }}
{{- $listen := include "extractedprism.listenAddress" . }}
{{- if not (include "extractedprism.isLoopback" $listen) }}
{{- fail (printf "bindAddress (or config.listen.address) %q is not loopback: with hostNetwork every host that can reach the node could use it as its path to the API server; set allowNonLoopbackBind=true if that is what you want (see docs/security.md)" $listen) }}
{{- end }}
{{- $health := include "extractedprism.healthAddress" . }}
{{- if not (include "extractedprism.isLoopback" $health) }}
{{- fail (printf "healthBindAddress (or config.admin.address) %q is not loopback: /status and /metrics would be served to the network (kubelet probes 127.0.0.1 either way); set allowNonLoopbackBind=true if that is what you want, e.g. for a ServiceMonitor (see docs/security.md)" $health) }}
{{- end }}
{{- end }}
{{- if and .Values.rbac.create (include "extractedprism.discoveryEnabled" .) (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) }}
{{- fail "serviceAccount.create=false needs serviceAccount.name: the pods would run as the namespace's default service account, and the discovery Role would be bound to it, so every pod of the namespace without a service account of its own could read it; name an existing service account, or set rbac.create=false and bind the Role yourself" }}
{{- end }}
{{- end }}

{{/*
Whether the daemon sets SO_REUSEPORT: reusePort when it is a bool, else
true exactly when a RollingUpdate surges (maxSurge not 0).
*/}}
{{- define "extractedprism.reusePort" -}}
{{- if kindIs "bool" .Values.reusePort -}}
{{- .Values.reusePort -}}
{{- else if eq .Values.updateStrategy.type "RollingUpdate" -}}
{{- $surge := toString (.Values.updateStrategy.maxSurge | default 0) -}}
{{- and (ne $surge "0") (ne $surge "0%") -}}
{{- else -}}
false
{{- end -}}
{{- end }}

{{/* Shared readiness: the publisher's name, its pods' selector labels and the ConfigMap and Lease it writes. */}}
{{- define "extractedprism.publisherName" -}}
{{- printf "%s-readiness-publisher" (include "extractedprism.fullname" . | trunc 42 | trimSuffix "-") }}
{{- end }}

{{- define "extractedprism.publisherSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-readiness-publisher" (include "extractedprism.name" . | trunc 42 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "extractedprism.publisherLabels" -}}
helm.sh/chart: {{ include "extractedprism.chart" . }}
{{ include "extractedprism.publisherSelectorLabels" . }}
app.kubernetes.io/component: readiness-publisher
app.kubernetes.io/part-of: {{ include "extractedprism.name" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "extractedprism.readinessConfigMap" -}}
{{- printf "%s-readiness" (include "extractedprism.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}

{{/*
The daemon's configuration file: `config`, with probe.shared_readiness
pointing at the publisher's ConfigMap when sharedReadiness is enabled (keys
set in `config` win).
*/}}
{{- define "extractedprism.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- if .Values.sharedReadiness.enabled }}
{{- $sr := dict "namespace" .Release.Namespace "name" (include "extractedprism.readinessConfigMap" .) "stale_after" .Values.sharedReadiness.staleAfter }}
{{- $cfg = mustMergeOverwrite (dict "probe" (dict "shared_readiness" $sr)) $cfg }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}
