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

{{/* The ServiceAccount every pod of the release runs as. */}}
{{- define "ghostwriter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "ghostwriter.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* Image of a stage: its own `image` values, each field falling back to the global `image`
     (tag: the chart's appVersion). (dict "root" $ "stage" "generator") */}}
{{- define "ghostwriter.stageImage" -}}
{{- $root := .root -}}
{{- $own := (index $root.Values .stage).image | default dict -}}
{{- $repository := $own.repository | default $root.Values.image.repository -}}
{{- $tag := $own.tag | default $root.Values.image.tag | default $root.Chart.AppVersion -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}

{{- define "ghostwriter.stagePullPolicy" -}}
{{- $own := (index .root.Values .stage).image | default dict -}}
{{- $own.pullPolicy | default .root.Values.image.pullPolicy -}}
{{- end -}}

{{/* The global image (ingest Job). */}}
{{- define "ghostwriter.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The model fetcher (Dockerfile's `models` target: the binary with python3 and pip). */}}
{{- define "ghostwriter.modelsImage" -}}
{{- $m := .Values.models.image -}}
{{- $repository := $m.repository | default .Values.image.repository -}}
{{- $tag := $m.tag | default (printf "%s-models" (.Values.image.tag | default .Chart.AppVersion)) -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}

{{/* The restricted Pod Security settings of a pod and of a container. */}}
{{- define "ghostwriter.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}
{{- define "ghostwriter.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/* gRPC URL of a stage's ClusterIP Service: (dict "root" $ "stage" "ranker") */}}
{{- define "ghostwriter.stageUrl" -}}
http://{{ include "ghostwriter.fullname" .root }}-{{ .stage }}:{{ .root.Values.grpcPort }}
{{- end -}}

{{/* A stage's headless Service, resolved by the caller into every ready pod (discovery.mode
     dns): (dict "root" $ "stage" "ranker") */}}
{{- define "ghostwriter.dnsUrl" -}}
dns:///{{ include "ghostwriter.fullname" .root }}-{{ .stage }}-headless.{{ .root.Release.Namespace }}.svc.{{ .root.Values.clusterDomain }}:{{ .root.Values.grpcPort }}
{{- end -}}

{{/* How callers reach a stage: its headless Service's DNS name in dns mode, its Service
     otherwise (etcd mode watches etcd). (dict "root" $ "stage" "ranker") */}}
{{- define "ghostwriter.callUrl" -}}
{{- if eq .root.Values.discovery.mode "dns" -}}
{{- include "ghostwriter.dnsUrl" . -}}
{{- else -}}
{{- include "ghostwriter.stageUrl" . -}}
{{- end -}}
{{- end -}}

{{/* etcd client URLs: the configured ones or the bundled etcd (https with tls.enabled: it is
     on the mesh, and the stages dial it with their certificate). */}}
{{- define "ghostwriter.etcdEndpoints" -}}
{{- if .Values.discovery.endpoints -}}
{{- join "," .Values.discovery.endpoints -}}
{{- else -}}
{{ ternary "https" "http" .Values.tls.enabled }}://{{ include "ghostwriter.fullname" . }}-etcd:2379
{{- end -}}
{{- end -}}

{{/* Whether Postgres is the system of record ("true" or empty). */}}
{{- define "ghostwriter.store" -}}
{{- if or .Values.store.url .Values.store.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* Per-pod retriever URLs, shard order (sharded retriever without etcd); with a store, each
     shard's replicas joined by `|` (one StatefulSet and headless Service per shard). */}}
{{- define "ghostwriter.retrieverShardUrls" -}}
{{- $root := . -}}
{{- $full := include "ghostwriter.fullname" $root -}}
{{- $urls := list -}}
{{- range $i := until (int $root.Values.retriever.replicaCount) -}}
{{- if include "ghostwriter.store" $root -}}
{{- $replicas := list -}}
{{- range $j := until (int $root.Values.retriever.replicasPerShard) -}}
{{- $replicas = append $replicas (printf "http://%s-retriever-shard-%d-%d.%s-retriever-shard-%d-headless:%v" $full $i $j $full $i $root.Values.grpcPort) -}}
{{- end -}}
{{- $urls = append $urls (join "|" $replicas) -}}
{{- else -}}
{{- $urls = append $urls (printf "http://%s-retriever-%d.%s-retriever-headless:%v" $full $i $full $root.Values.grpcPort) -}}
{{- end -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{/* Where the TLS Secret is mounted in every pod that speaks TLS. */}}
{{- define "ghostwriter.tlsDir" -}}
/etc/ghostwriter/tls
{{- end -}}

{{/* The Secret with tls.crt, tls.key and ca.crt: tls.secretName, or the one the chart's
     cert-manager Certificate issues. */}}
{{- define "ghostwriter.tlsSecretName" -}}
{{- if .Values.tls.secretName -}}
{{- .Values.tls.secretName -}}
{{- else if .Values.tls.certManager.enabled -}}
{{- printf "%s-tls" (include "ghostwriter.fullname" .) -}}
{{- else -}}
{{- fail "tls.enabled needs tls.secretName (an existing Secret with the keys tls.crt, tls.key and ca.crt) or tls.certManager.enabled (the chart issues one)" -}}
{{- end -}}
{{- end -}}

{{/* Fails the render on TLS values that cannot work. */}}
{{- define "ghostwriter.tlsCheck" -}}
{{- if .Values.tls.enabled -}}
{{- if not .Values.metrics.enabled -}}
{{- fail "tls.enabled needs metrics.enabled: the kubelet's gRPC probes cannot speak TLS, so with TLS the probes ask /readyz and /healthz on the metrics port (metrics.port)" -}}
{{- end -}}
{{- $_ := include "ghostwriter.tlsSecretName" . -}}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name (an Issuer or ClusterIssuer that fills ca.crt)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The TLS flags of every stage (the process's certificate, key, CA and mesh name). */}}
{{- define "ghostwriter.tlsArgs" -}}
{{- $dir := include "ghostwriter.tlsDir" . -}}
- --tls-cert={{ $dir }}/tls.crt
- --tls-key={{ $dir }}/tls.key
- --tls-ca={{ $dir }}/ca.crt
- --tls-server-name={{ .Values.tls.serverName }}
{{- end -}}

{{/* The TLS Secret as a volume named `tls` (whole, not subPath: the kubelet's updates reach
     the pod and the process reloads them). Optional `items`: (dict "root" $ "items" (list ...)) */}}
{{- define "ghostwriter.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ include "ghostwriter.tlsSecretName" .root }}
    # Readable by the pod's fsGroup only.
    defaultMode: 0440
    {{- with .items }}
    items:
      {{- range . }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
    {{- end }}
{{- end -}}

{{- define "ghostwriter.tlsVolumeMount" -}}
- name: tls
  mountPath: {{ include "ghostwriter.tlsDir" . }}
  readOnly: true
{{- end -}}

{{/* Stage arguments after `serve STAGE --listen ...`. */}}
{{- define "ghostwriter.stageArgs" -}}
{{- $root := .root -}}
{{- $v := index $root.Values .stage -}}
{{- if eq .stage "orchestrator" }}
{{- if and (eq $root.Values.discovery.mode "dns") (gt (int $root.Values.retriever.replicaCount) 1) }}
- --retriever-url={{ include "ghostwriter.retrieverShardUrls" $root }}
{{- else }}
- --retriever-url={{ include "ghostwriter.callUrl" (dict "root" $root "stage" "retriever") }}
{{- end }}
- --retriever-shards={{ $root.Values.retriever.replicaCount }}
- --ranker-url={{ include "ghostwriter.callUrl" (dict "root" $root "stage" "ranker") }}
- --summarizer-url={{ include "ghostwriter.callUrl" (dict "root" $root "stage" "summarizer") }}
- --synthesizer-url={{ include "ghostwriter.callUrl" (dict "root" $root "stage" "synthesizer") }}
- --generator-url={{ include "ghostwriter.callUrl" (dict "root" $root "stage" "generator") }}
- --request-timeout={{ $v.requestTimeoutSeconds }}
- --max-candidates={{ $v.maxCandidates }}
{{- if $v.auth.tokensSecret }}
- --auth-tokens=/etc/ghostwriter/auth/tokens
{{- end }}
{{- with $v.auth.jwt }}
{{- if .secretName }}
{{- if not .issuer }}
{{- fail "orchestrator.auth.jwt.secretName needs orchestrator.auth.jwt.issuer (the iss every token must carry)" }}
{{- end }}
{{- if eq .type "hs256" }}
- --auth-jwt-secret-file=/etc/ghostwriter/jwt/{{ .key }}
{{- else if eq .type "keys" }}
- --auth-jwt-keys=/etc/ghostwriter/jwt/{{ .key }}
{{- else }}
{{- fail "orchestrator.auth.jwt.type is keys (a PEM public key or a JWK set) or hs256 (a shared secret)" }}
{{- end }}
- --auth-jwt-issuer={{ .issuer }}
- --auth-jwt-audience={{ .audience }}
{{- end }}
{{- end }}
{{- if and $v.auth.insecureNoAuth (not $v.auth.tokensSecret) (not $v.auth.jwt.secretName) }}
- --insecure-no-auth
{{- end }}
{{- if $v.cacheSalt.secretName }}
- --cache-salt-key-file=/etc/ghostwriter/cache-salt/{{ $v.cacheSalt.key }}
{{- end }}
{{- else if eq .stage "retriever" }}
- --index-dir=/data/index
- --retrieve-limit={{ $v.retrieveLimit }}
{{- if include "ghostwriter.store" $root }}
- --retriever-shards={{ $v.replicaCount }}
- --max-lag={{ $root.Values.store.maxLagSeconds }}
{{- end }}
{{- else if eq .stage "ranker" }}
- --embedder-device={{ $v.embedderDevice }}
- --embedding-cache={{ $v.embeddingCache }}
{{- else if eq .stage "summarizer" }}
- --generator-url={{ include "ghostwriter.callUrl" (dict "root" $root "stage" "generator") }}
- --summary-tokens={{ $v.summaryTokens }}
- --summary-num-beams={{ $v.summaryNumBeams }}
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
- --adapter-memory-mb={{ $v.adapters.memoryMb }}
{{- if $v.adapters.claimName }}
- --adapter-dir=/adapters
{{- end }}
{{- if $v.model }}
- --model={{ $v.model }}
{{- else if $v.gpuTier }}
- --model=/models/qwen2.5-coder-1.5b-instruct/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
{{- end }}
{{- end }}
{{- range $v.extraArgs }}
- {{ . }}
{{- end }}
{{- end -}}

{{/* The pod's grace before SIGKILL: terminationGracePeriodSeconds, or (0) the drain delay and
     timeout and 5 s more. */}}
{{- define "ghostwriter.gracePeriod" -}}
{{- if .Values.terminationGracePeriodSeconds -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add .Values.drainDelaySeconds .Values.drainTimeoutSeconds 5 -}}
{{- end -}}
{{- end -}}

{{/* Whether a stage loads models. */}}
{{- define "ghostwriter.needsModels" -}}
{{- if has .stage (list "ranker" "summarizer" "synthesizer" "generator") -}}true{{- end -}}
{{- end -}}

{{/* topologySpreadConstraints of a stage: its own or the global ones; a constraint without a
     labelSelector spreads the stage's own pods. (dict "root" $ "stage" "ranker") */}}
{{- define "ghostwriter.topologySpread" -}}
{{- $v := index .root.Values .stage -}}
{{- $constraints := $v.topologySpreadConstraints | default .root.Values.topologySpreadConstraints -}}
{{- $out := list -}}
{{- range $constraints -}}
{{- $c := deepCopy . -}}
{{- if not (hasKey $c "labelSelector") -}}
{{- $_ := set $c "labelSelector" (dict "matchLabels" (include "ghostwriter.selectorLabels" $ | fromYaml)) -}}
{{- end -}}
{{- $out = append $out $c -}}
{{- end -}}
{{- if $out -}}
{{- toYaml $out -}}
{{- end -}}
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
    {{- if hasKey . "shard" }}
    ghostwriter.io/shard: {{ .shard | quote }}
    {{- end }}
    {{- with merge (deepCopy ($v.podLabels | default dict)) ($root.Values.podLabels | default dict) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- with merge (deepCopy ($v.podAnnotations | default dict)) ($root.Values.podAnnotations | default dict) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "ghostwriter.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $v.priorityClassName | default $root.Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $v.runtimeClassName | default $root.Values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "ghostwriter.podSecurityContext" $root | nindent 4 }}
  terminationGracePeriodSeconds: {{ include "ghostwriter.gracePeriod" $root }}
  {{- if and $models $root.Values.models.pull }}
  initContainers:
    # `ghostwriter models pull` (pip, sha256-verified) into the models volume, from the image
    # with pip (Dockerfile's `models` target); the stage's own image has no Python.
    - name: models-pull
      image: {{ include "ghostwriter.modelsImage" $root }}
      imagePullPolicy: {{ $root.Values.models.image.pullPolicy | default $root.Values.image.pullPolicy }}
      args: ["models", "pull", "--dir", "/models"{{ if and (eq $stage "generator") $v.gpuTier }}, "--gpu-tier"{{ end }}]
      env:
        - name: HOME
          value: /tmp
        - name: PIP_NO_CACHE_DIR
          value: "1"
        {{- with $root.Values.models.pipIndexUrl }}
        - name: PIP_INDEX_URL
          value: {{ . | quote }}
        {{- end }}
      securityContext:
        {{- include "ghostwriter.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        - name: models
          mountPath: /models
        - name: tmp
          mountPath: /tmp
  {{- end }}
  containers:
    - name: {{ $stage }}
      image: {{ include "ghostwriter.stageImage" . }}
      imagePullPolicy: {{ include "ghostwriter.stagePullPolicy" . }}
      args:
        - serve
        - --listen=0.0.0.0:{{ $root.Values.grpcPort }}
        - --max-concurrency={{ $root.Values.maxConcurrency }}
        {{- if $root.Values.tls.enabled }}
        {{- include "ghostwriter.tlsArgs" $root | nindent 8 }}
        {{- end }}
        {{- if $root.Values.metrics.enabled }}
        - --metrics-listen=0.0.0.0:{{ $root.Values.metrics.port }}
        {{- end }}
        {{- if eq $root.Values.discovery.mode "etcd" }}
        - --etcd={{ include "ghostwriter.etcdEndpoints" $root }}
        - --etcd-ttl={{ $root.Values.discovery.ttlSeconds }}
        - --advertise=http://$(POD_IP):{{ $root.Values.grpcPort }}
        {{- if and (eq $stage "retriever") (not (hasKey . "shard")) }}
        - --shard=$(POD_INDEX)
        {{- end }}
        {{- end }}
        {{- if hasKey . "shard" }}
        - --shard={{ .shard }}
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
        {{- if $root.Values.store.existingSecret }}
        # Only the retriever pods hold the store's credentials.
        - name: GHOSTWRITER_STORE
          valueFrom:
            secretKeyRef:
              name: {{ $root.Values.store.existingSecret }}
              key: {{ $root.Values.store.existingSecretKey }}
        {{- else if $root.Values.store.url }}
        - name: GHOSTWRITER_STORE
          value: {{ $root.Values.store.url | quote }}
        {{- end }}
        {{- end }}
        {{- with $root.Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
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
      {{- if $root.Values.tls.enabled }}
      # The kubelet's gRPC probes cannot speak TLS: plain HTTP on the metrics port instead,
      # /readyz answering 200 once every server of the process is SERVING.
      startupProbe:
        httpGet:
          path: /readyz
          port: metrics
        periodSeconds: {{ $root.Values.probes.startup.periodSeconds }}
        failureThreshold: {{ $root.Values.probes.startup.failureThreshold }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
        periodSeconds: {{ $root.Values.probes.readiness.periodSeconds }}
        failureThreshold: {{ $root.Values.probes.readiness.failureThreshold }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        periodSeconds: {{ $root.Values.probes.liveness.periodSeconds }}
        failureThreshold: {{ $root.Values.probes.liveness.failureThreshold }}
      {{- else }}
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
      {{- end }}
      securityContext:
        {{- include "ghostwriter.containerSecurityContext" $root | nindent 8 }}
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
        {{- if and (eq $stage "generator") $v.adapters.claimName }}
        - name: adapters
          mountPath: /adapters
          readOnly: true
        {{- end }}
        # The root filesystem is read-only: scratch space (and the CUDA JIT cache) lives here.
        - name: tmp
          mountPath: /tmp
        {{- if and (eq $stage "orchestrator") $v.auth.tokensSecret }}
        - name: auth
          mountPath: /etc/ghostwriter/auth
          readOnly: true
        {{- end }}
        {{- if and (eq $stage "orchestrator") $v.auth.jwt.secretName }}
        - name: jwt
          mountPath: /etc/ghostwriter/jwt
          readOnly: true
        {{- end }}
        {{- if and (eq $stage "orchestrator") $v.cacheSalt.secretName }}
        - name: cache-salt
          mountPath: /etc/ghostwriter/cache-salt
          readOnly: true
        {{- end }}
        {{- if $root.Values.tls.enabled }}
        {{- include "ghostwriter.tlsVolumeMount" $root | nindent 8 }}
        {{- end }}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
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
    {{- if and (eq $stage "generator") $v.adapters.claimName }}
    - name: adapters
      persistentVolumeClaim:
        claimName: {{ $v.adapters.claimName }}
        readOnly: true
    {{- end }}
    {{- if and (eq $stage "orchestrator") $v.auth.tokensSecret }}
    - name: auth
      secret:
        secretName: {{ $v.auth.tokensSecret }}
        items:
          - key: tokens
            path: tokens
    {{- end }}
    {{- if and (eq $stage "orchestrator") $v.auth.jwt.secretName }}
    # Whole (not subPath): the kubelet's updates reach the pod, which re-reads the file.
    - name: jwt
      secret:
        secretName: {{ $v.auth.jwt.secretName }}
        defaultMode: 0440
        items:
          - key: {{ $v.auth.jwt.key }}
            path: {{ $v.auth.jwt.key }}
    {{- end }}
    {{- if and (eq $stage "orchestrator") $v.cacheSalt.secretName }}
    - name: cache-salt
      secret:
        secretName: {{ $v.cacheSalt.secretName }}
        defaultMode: 0440
        items:
          - key: {{ $v.cacheSalt.key }}
            path: {{ $v.cacheSalt.key }}
    {{- end }}
    {{- if $root.Values.tls.enabled }}
    {{- include "ghostwriter.tlsVolume" (dict "root" $root) | nindent 4 }}
    {{- end }}
    {{- with $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with include "ghostwriter.topologySpread" . }}
  topologySpreadConstraints:
    {{- . | nindent 4 }}
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

{{/* PromQL label matchers for one stage's pods of this release (the `namespace` and `pod`
     target labels Prometheus adds): (dict "root" $ "stage" "generator") */}}
{{- define "ghostwriter.promSelector" -}}
namespace="{{ .root.Release.Namespace }}",pod=~"{{ include "ghostwriter.fullname" .root }}-{{ .stage }}-.*"
{{- end -}}
