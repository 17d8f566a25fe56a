"""Checks a rendered chart (helm template output): the restricted Pod Security settings of every
pod (workloads, hooks, init containers) and what the custom resources need; prints a JSON summary
of the workloads, Services and hooks, or exits 1 listing the problems.

Usage: inspect_render.py RENDERED.yaml (PyYAML on PYTHONPATH)
"""
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
problems, workloads, services, hooks = [], [], [], []
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                   "persistentVolumeClaim", "projected", "secret"}

def pod_spec(d):
    k, s = d["kind"], d.get("spec", {})
    if k == "Pod":
        return s
    if k in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return s["template"]["spec"]
    if k == "CronJob":
        return s["jobTemplate"]["spec"]["template"]["spec"]
    return None

for d in docs:
    kind, name = d["kind"], d["metadata"]["name"]
    where = f"{kind}/{name}"
    hook = (d["metadata"].get("annotations") or {}).get("helm.sh/hook")
    if hook:
        hooks.append({"kind": kind, "name": name, "hook": hook})
    if kind == "Service":
        services.append({"name": name, "clusterIP": d["spec"].get("clusterIP"),
                         "ports": [p.get("name") for p in d["spec"]["ports"]],
                         "labels": d["metadata"].get("labels") or {}})
    spec = pod_spec(d)
    if spec is None:
        continue
    psc = spec.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True:
        problems.append(f"{where}: pod runAsNonRoot is not true")
    if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: pod seccompProfile is not RuntimeDefault")
    if psc.get("runAsUser") == 0:
        problems.append(f"{where}: pod runs as uid 0")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{where}: {key}")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: the service account token is mounted")
    for v in spec.get("volumes") or []:
        types = set(v) - {"name"}
        if not types <= ALLOWED_VOLUMES:
            problems.append(f"{where}: volume {v['name']} of type {types}")
    containers = [("init", c) for c in spec.get("initContainers") or []] + \
                 [("main", c) for c in spec["containers"]]
    entry = {"kind": kind, "name": name, "containers": []}
    for role, c in containers:
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{cw}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{cw}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{cw}: capabilities do not drop ALL")
        if caps.get("add"):
            problems.append(f"{cw}: adds capabilities {caps['add']}")
        if sc.get("runAsNonRoot") is not True:
            problems.append(f"{cw}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{cw}: runs as uid 0")
        if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{cw}: seccompProfile is not RuntimeDefault")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{cw}: the root filesystem is writable")
        probes = {}
        for key in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = c.get(key)
            if p is None:
                continue
            if "grpc" in p:
                probes[key] = {"type": "grpc", "port": p["grpc"]["port"]}
            elif "httpGet" in p:
                probes[key] = {"type": "httpGet", "path": p["httpGet"].get("path"),
                               "port": p["httpGet"]["port"]}
            else:
                probes[key] = {"type": "other"}
        entry["containers"].append({"name": c["name"], "role": role, "image": c["image"],
                                    "args": [str(a) for a in c.get("args") or []],
                                    "probes": probes,
                                    "mounts": [{"name": m["name"], "path": m["mountPath"],
                                                "readOnly": bool(m.get("readOnly"))}
                                               for m in c.get("volumeMounts") or []]})
    entry["secrets"] = {v["name"]: {"secretName": v["secret"]["secretName"],
                                    "keys": [i["key"] for i in v["secret"].get("items") or []]}
                        for v in spec.get("volumes") or [] if "secret" in v}
    workloads.append(entry)

names = {(d["kind"], d["metadata"]["name"]) for d in docs}
certificates = []
for d in docs:
    kind, name, spec = d["kind"], d["metadata"]["name"], d.get("spec", {})
    if kind == "ScaledObject":
        t = spec["scaleTargetRef"]
        if (t["kind"], t["name"]) not in names:
            problems.append(f"ScaledObject/{name} scales {t['kind']}/{t['name']}, not rendered")
    if kind == "PrometheusRule":
        for g in spec["groups"]:
            for r in g["rules"]:
                if not (r.get("alert") and r.get("expr")):
                    problems.append(f"PrometheusRule/{name}: a rule without alert or expr")
    if kind == "GRPCRoute":
        if not spec.get("parentRefs"):
            problems.append(f"GRPCRoute/{name} without parentRefs")
        for rule in spec["rules"]:
            for b in rule["backendRefs"]:
                if ("Service", b["name"]) not in names:
                    problems.append(f"GRPCRoute/{name} routes to Service {b['name']}, not rendered")
    if kind == "Ingress":
        for rule in spec["rules"]:
            for path in rule["http"]["paths"]:
                svc = path["backend"]["service"]["name"]
                if ("Service", svc) not in names:
                    problems.append(f"Ingress/{name} routes to Service {svc}, not rendered")
    if kind == "Certificate":
        for key in ("secretName", "dnsNames", "issuerRef", "usages"):
            if not spec.get(key):
                problems.append(f"Certificate/{name} without {key}")
        if not (spec.get("issuerRef") or {}).get("name"):
            problems.append(f"Certificate/{name}: issuerRef without a name")
        certificates.append({"name": name, "secretName": spec.get("secretName"),
                             "dnsNames": spec.get("dnsNames") or [],
                             "usages": spec.get("usages") or [],
                             "issuerRef": spec.get("issuerRef") or {}})
    if kind == "ConfigMap" and (d["metadata"].get("labels") or {}).get("grafana_dashboard") == "1":
        for key, text in d["data"].items():
            dash = json.loads(text)
            for p in dash["panels"]:
                if p["type"] != "row" and not all(t.get("expr") for t in p["targets"]):
                    problems.append(f"dashboard {key}: panel {p['title']!r} without a query")

if problems:
    print("\n".join(problems))
    sys.exit(1)
print(json.dumps({"kinds": sorted({d["kind"] for d in docs}), "workloads": workloads,
                  "services": services, "hooks": hooks, "certificates": certificates}))
