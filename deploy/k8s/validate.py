#!/usr/bin/env python3
"""Offline validation of deploy/k8s/*.yaml.

Core Kubernetes kinds: kubernetes-validate (bundled OpenAPI schemas, strict: unknown fields
fail). KEDA kinds (ScaledObject, TriggerAuthentication): jsonschema against the
openAPIV3Schema of KEDA's own CRDs, read from the KEDA Go module (`go mod download`), since no
bundled schema knows them. Also checks cross-references (ConfigMap / Secret / Deployment names,
label selectors, the worker config in the ConfigMap parses as TOML with the expected tables).
Exit status 1 on any failure.
"""

import glob
import json
import os
import subprocess
import sys
import tomllib

import jsonschema
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
KEDA_MODULE = "github.com/kedacore/keda/v2@v2.21.0"
K8S_VERSION = "1.33.0"


def keda_schemas():
    env = dict(os.environ, GOFLAGS="-modcacherw")
    out = subprocess.run(["go", "mod", "download", "-json", KEDA_MODULE], check=True, capture_output=True, text=True, env=env, cwd=HERE)
    base = os.path.join(json.loads(out.stdout)["Dir"], "config", "crd", "bases")
    schemas = {}
    for f in glob.glob(os.path.join(base, "keda.sh_*.yaml")):
        crd = yaml.safe_load(open(f))
        for v in crd["spec"]["versions"]:
            schemas[(f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return schemas


def main():
    docs = []
    for f in sorted(glob.glob(os.path.join(HERE, "*.yaml"))):
        for d in yaml.safe_load_all(open(f)):
            if d:
                docs.append((os.path.basename(f), d))
    keda = keda_schemas()
    failures = 0
    for f, d in docs:
        what = f"{f}: {d['kind']} {d['metadata']['name']}"
        try:
            if d["apiVersion"].startswith("keda.sh/"):
                jsonschema.validate(d, keda[(d["apiVersion"], d["kind"])])
                print(f"OK   {what} (KEDA CRD schema, {KEDA_MODULE})")
            else:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
                print(f"OK   {what} (Kubernetes {K8S_VERSION}, strict)")
        except Exception as e:  # noqa: BLE001 - report every document
            failures += 1
            print(f"FAIL {what}: {getattr(e, 'message', e)}")

    by_kind = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    dep = by_kind[("Deployment", "framelink-worker")]
    pod = dep["spec"]["template"]
    checks = [
        ("Deployment selector matches its pod labels", dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()),
        ("PodDisruptionBudget selects the worker pods", by_kind[("PodDisruptionBudget", "framelink-worker")]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()),
        ("ScaledObject targets the Deployment", by_kind[("ScaledObject", "framelink-worker")]["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]),
        ("volumes name an existing ConfigMap and Secret", all(
            ("ConfigMap", v["configMap"]["name"]) in by_kind if "configMap" in v else ("Secret", v["secret"]["secretName"]) in by_kind
            for v in pod["spec"]["volumes"])),
        ("TriggerAuthentication keys exist in the Secret", all(
            r["key"] in by_kind[("Secret", r["name"])]["stringData"] for r in by_kind[("TriggerAuthentication", "framelink-kafka-tls")]["spec"]["secretTargetRef"])),
    ]
    cfg = tomllib.loads(by_kind[("ConfigMap", "framelink-worker")]["data"]["worker.toml"])
    scaled = by_kind[("ScaledObject", "framelink-worker")]["spec"]["triggers"][0]["metadata"]
    checks += [
        ("ConfigMap worker.toml has kafka/consumer/output/worker tables", {"kafka", "consumer", "output", "worker"} <= cfg.keys()),
        ("KEDA watches the worker's consumer group and topic", scaled["consumerGroup"] == cfg["consumer"]["group_id"] and scaled["topic"] in cfg["consumer"]["topics"]),
        ("TLS paths point into the mounted Secret", all(p.startswith("/etc/framelink/tls/") for p in cfg["kafka"]["tls"].values())),
    ]
    con = by_kind[("Deployment", "framelink-console")]
    con_pod = con["spec"]["template"]
    con_cfg = tomllib.loads(by_kind[("ConfigMap", "framelink-console")]["data"]["console.toml"])
    checks += [
        ("console Deployment selector matches its pod labels", con["spec"]["selector"]["matchLabels"].items() <= con_pod["metadata"]["labels"].items()),
        ("console volumes name an existing ConfigMap and Secret", all(
            ("ConfigMap", v["configMap"]["name"]) in by_kind if "configMap" in v else ("Secret", v["secret"]["secretName"]) in by_kind
            for v in con_pod["spec"]["volumes"])),
        # Bound beyond loopback the console refuses to start without a token.
        ("console bound beyond loopback has a token file in a mounted Secret", con_cfg["console"]["listen"].startswith("127.") or any(
            con_cfg["console"].get("token_file", "").startswith(m["mountPath"] + "/") for m in con_pod["spec"]["containers"][0]["volumeMounts"])),
        ("console's lag chart watches the workers' group and topics", con_cfg["lag"]["group"] == cfg["consumer"]["group_id"] and con_cfg["lag"]["topics"] == cfg["consumer"]["topics"]),
        ("workers process the console's large-image tiles on its topics", cfg.get("tiles", {}).get("enabled") is True and all(
            cfg["tiles"].get(k, d) == con_cfg.get("jobs", {}).get(j, d) for k, j, d in
            (("topic", "tiles_topic", "framelink.tiles"), ("results_topic", "results_topic", "framelink.tiles.results"), ("jobs_topic", "jobs_topic", "framelink.jobs")))),
        ("console's Service targets its port", by_kind[("Service", "framelink-console")]["spec"]["ports"][0]["targetPort"] == con_pod["spec"]["containers"][0]["ports"][0]["name"]),
    ]
    for name, ok in checks:
        print(f"{'OK  ' if ok else 'FAIL'} {name}")
        failures += not ok
    print(f"{len(docs)} documents, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
