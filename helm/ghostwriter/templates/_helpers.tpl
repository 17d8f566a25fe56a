{{/* Chart name, truncated to the DNS label limit. */}}
{{- define "ghostwriter.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ghostwriter.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one stage: (dict "root" $ "stage" "ranker") */}}
{{- define "ghostwriter.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .stage }}
{{- end -}}

{{- define "ghostwriter.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* gRPC URL of a stage's Service: (dict "root" $ "stage" "ranker") */}}
{{- define "ghostwriter.stageUrl" -}}
http://{{ include "ghostwriter.fullname" .root }}-{{ .stage }}:{{ .root.Values.grpcPort }}
{{- end -}}

{{/* etcd client URLs: the configured ones or the bundled etcd. */}}
{{- define "ghostwriter.etcdEndpoints" -}}
{{- if .Values.discovery.endpoints -}}
{{- join "," .Values.discovery.endpoints -}}
{{- else -}}
http://{{ include "ghostwriter.fullname" . }}-etcd:2379
{{- end -}}
{{- end -}}

{{/* Per-pod retriever URLs, shard order (static sharding without discovery). */}}
{{- define "ghostwriter.retrieverShardUrls" -}}
{{- $root := . -}}
{{- $urls := list -}}
{{- range $i := until (int $root.Values.retriever.replicaCount) -}}
{{- $urls = append $urls (printf "http://%s-retriever-%d.%s-retriever-headless:%v" (include "ghostwriter.fullname" $root) $i (include "ghostwriter.fullname" $root) $root.Values.grpcPort) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/* Stage arguments after `serve STAGE --listen ...`. */}}
{{- define "ghostwriter.stageArgs" -}}
{{- $root := .root -}}
{{- $v := index $root.Values .stage -}}
{{- if eq .stage "orchestrator" }}
{{- if and (not $root.Values.discovery.enabled) (gt (int $root.Values.retriever.replicaCount) 1) }}
- --retriever-url={{ include "ghostwriter.retrieverShardUrls" $root }}
{{- else }}
- --retriever-url={{ include "ghostwriter.stageUrl" (dict "root" $root "stage" "retriever") }}
{{- end }}
- --retriever-shards={{ $root.Values.retriever.replicaCount }}
- --ranker-url={{ include "ghostwriter.stageUrl" (dict "root" $root "stage" "ranker") }}
- --summarizer-url={{ include "ghostwriter.stageUrl" (dict "root" $root "stage" "summarizer") }}
- --synthesizer-url={{ include "ghostwriter.stageUrl" (dict "root" $root "stage" "synthesizer") }}
- --generator-url={{ include "ghostwriter.stageUrl" (dict "root" $root "stage" "generator") }}
- --request-timeout={{ $v.requestTimeoutSeconds }}
- --max-candidates={{ $v.maxCandidates }}
{{- if $v.auth.tokensSecret }}
- --auth-tokens=/etc/ghostwriter/auth/tokens
{{- else if $v.auth.insecureNoAuth }}
- --insecure-no-auth
{{- end }}
{{- else if eq .stage "retriever" }}
- --index-dir=/data/index
- --retrieve-limit={{ $v.retrieveLimit }}
{{- else if eq .stage "ranker" }}
- --embedder-device={{ $v.embedderDevice }}
- --embedding-cache={{ $v.embeddingCache }}
{{- else if eq .stage "summarizer" }}
- --generator-url={{ include "ghostwriter.stageUrl" (dict "root" $root "stage" "generator") }}
- --summary-tokens={{ $v.summaryTokens }}
- --summary-chars={{ $v.summaryChars }}
{{- else if eq .stage "synthesizer" }}
- --word-similarity={{ $v.wordSimilarity }}
{{- else if eq .stage "generator" }}
- --device={{ $v.device }}
- --max-new-tokens={{ $v.maxNewTokens }}
- --queue-capacity={{ $v.queueCapacity }}
- --max-running={{ $v.maxRunning }}
- --max-batch-tokens={{ $v.maxBatchTokens }}
- --kv-cache-mb={{ $v.kvCacheMb }}
{{- if $v.model }}
- --model={{ $v.model }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Whether a stage loads models. */}}
{{- define "ghostwriter.needsModels" -}}
{{- if has .stage (list "ranker" "summarizer" "synthesizer" "generator") -}}true{{- end -}}
{{- end -}}

{{/* The pod template of a stage: (dict "root" $ "stage" "ranker") */}}
{{- define "ghostwriter.podTemplate" -}}
{{- $root := .root -}}
{{- $stage := .stage -}}
{{- $v := index $root.Values $stage -}}
{{- $models := include "ghostwriter.needsModels" . -}}
metadata:
  labels:
    {{- include "ghostwriter.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $stage }}
  annotations:
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
  {{- if and $models $root.Values.models.pull }}
  initContainers:
    - name: models-pull
      image: {{ include "ghostwriter.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args: ["models", "pull", "--dir", "/models"]
      {{- with $root.Values.models.pipIndexUrl }}
      env:
        - name: PIP_INDEX_URL
          value: {{ . | quote }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: models
          mountPath: /models
  {{- end }}
  containers:
    - name: {{ $stage }}
      image: {{ include "ghostwriter.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args:
        - serve
        - --listen=0.0.0.0:{{ $root.Values.grpcPort }}
        - --max-concurrency={{ $root.Values.maxConcurrency }}
        {{- if $root.Values.metrics.enabled }}
        - --metrics-listen=0.0.0.0:{{ $root.Values.metrics.port }}
        {{- end }}
        {{- if $root.Values.discovery.enabled }}
        - --etcd={{ include "ghostwriter.etcdEndpoints" $root }}
        - --etcd-ttl={{ $root.Values.discovery.ttlSeconds }}
        - --advertise=http://$(POD_IP):{{ $root.Values.grpcPort }}
        {{- if eq $stage "retriever" }}
        - --shard=$(POD_INDEX)
        {{- end }}
        {{- end }}
        - {{ $stage }}
        {{- include "ghostwriter.stageArgs" . | trim | nindent 8 }}
      envFrom:
        - configMapRef:
            name: {{ include "ghostwriter.fullname" $root }}
      env:
        - name: OTEL_SERVICE_NAME
          value: ghostwriter-{{ $stage }}
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        {{- if eq $stage "retriever" }}
        - name: POD_INDEX
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ $root.Values.grpcPort }}
          protocol: TCP
        {{- if $root.Values.metrics.enabled }}
        - name: metrics
          containerPort: {{ $root.Values.metrics.port }}
          protocol: TCP
        {{- end }}
      startupProbe:
        grpc:
          port: {{ $root.Values.grpcPort }}
        periodSeconds: {{ $root.Values.probes.startup.periodSeconds }}
        failureThreshold: {{ $root.Values.probes.startup.failureThreshold }}
      readinessProbe:
        grpc:
          port: {{ $root.Values.grpcPort }}
        periodSeconds: {{ $root.Values.probes.readiness.periodSeconds }}
        failureThreshold: {{ $root.Values.probes.readiness.failureThreshold }}
      livenessProbe:
        grpc:
          port: {{ $root.Values.grpcPort }}
        periodSeconds: {{ $root.Values.probes.liveness.periodSeconds }}
        failureThreshold: {{ $root.Values.probes.liveness.failureThreshold }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      resources:
        {{- $resources := deepCopy $v.resources }}
        {{- if and (eq $stage "generator") $v.gpu.enabled }}
        {{- $limits := default dict $resources.limits }}
        {{- $_ := set $limits "nvidia.com/gpu" $v.gpu.count }}
        {{- $_ := set $resources "limits" $limits }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        {{- if $models }}
        - name: models
          mountPath: /models
        {{- end }}
        {{- if eq $stage "retriever" }}
        - name: index
          mountPath: /data
        {{- end }}
        - name: tmp
          mountPath: /tmp
        {{- if and (eq $stage "orchestrator") $v.auth.tokensSecret }}
        - name: auth
          mountPath: /etc/ghostwriter/auth
          readOnly: true
        {{- end }}
  volumes:
    {{- if $models }}
    - name: models
      {{- if $root.Values.models.persistence.enabled }}
      persistentVolumeClaim:
        claimName: {{ include "ghostwriter.fullname" $root }}-models
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
    - name: tmp
      emptyDir: {}
    {{- if and (eq $stage "orchestrator") $v.auth.tokensSecret }}
    - name: auth
      secret:
        secretName: {{ $v.auth.tokensSecret }}
        items:
          - key: tokens
            path: tokens
    {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
