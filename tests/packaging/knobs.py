"""Pod-level settings of a rendered chart's Deployments and StatefulSets, its NetworkPolicies'
rules, the ConfigMap, the ScaledObject and the alert rules, as JSON.

Usage: knobs.py RENDERED.yaml (PyYAML on PYTHONPATH)
"""
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
out = {"pods": {}, "policies": {}, "config": {}, "scaled": {}, "rules": []}
for d in docs:
    kind, name, spec = d["kind"], d["metadata"]["name"], d.get("spec", {})
    if kind in ("Deployment", "StatefulSet"):
        t = spec["template"]
        out["pods"][name] = {
            "strategy": spec.get("strategy"),
            "labels": t["metadata"].get("labels") or {},
            "annotations": t["metadata"].get("annotations") or {},
            "runtimeClassName": t["spec"].get("runtimeClassName"),
            "priorityClassName": t["spec"].get("priorityClassName"),
            "grace": t["spec"].get("terminationGracePeriodSeconds"),
            "volumes": [v["name"] for v in t["spec"].get("volumes") or []],
        }
    if kind == "NetworkPolicy":
        rules = []
        for r in spec.get("ingress") or []:
            rules.append({"ports": [p["port"] for p in r.get("ports") or []],
                          "from": r.get("from")})
        out["policies"][name] = {"types": spec["policyTypes"], "rules": rules}
    if kind == "ConfigMap" and "data" in d and "RUST_LOG" in d["data"]:
        out["config"] = d["data"]
    if kind == "ScaledObject":
        out["scaled"] = spec
    if kind == "PrometheusRule":
        for g in spec["groups"]:
            out["rules"].extend(g["rules"])
print(json.dumps(out))
