"""Print, as JSON, what the fleet test checks in Kubernetes manifests: each
ConfigMap's data, and every command line a Pod template runs (containers,
init containers, exec probes). Usage: python k8s_manifests.py FILE...

Exit 3: PyYAML is missing: run scripts/setup-test-deps.sh (it comes with
kubernetes-validate).
"""
import json
import sys

try:
    import yaml
except ImportError:
    sys.exit(3)

out = {"configmaps": {}, "commands": []}
for path in sys.argv[1:]:
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if not doc:
                continue
            kind, name = doc.get("kind"), doc.get("metadata", {}).get("name")
            if kind == "ConfigMap":
                out["configmaps"][name] = doc.get("data", {})
            spec = (doc.get("spec") or {}).get("template", {}).get("spec")
            if not spec:
                continue
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                where = "%s/%s/%s" % (kind, name, c["name"])
                if "command" in c:
                    out["commands"].append({"where": where, "argv": c["command"] + c.get("args", [])})
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    p = c.get(probe) or {}
                    if "exec" in p:
                        out["commands"].append({"where": where + "/" + probe, "argv": p["exec"]["command"]})
json.dump(out, sys.stdout)
