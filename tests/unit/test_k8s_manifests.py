"""deploy/ manifests cannot be applied here: check they parse and name what the package has."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml

from tests.unit.test_deploy import rules_file_env_names, settings_fields

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PLATFORM_ENV = {"NVIDIA_VISIBLE_DEVICES"}


def documents() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def config_keys(kind: str) -> set[str]:
    keys: set[str] = set()
    for doc in documents():
        if doc["kind"] == kind:
            keys |= set(doc.get("data", {})) | set(doc.get("stringData", {}))
    return keys


def test_every_workload_runs_a_module_of_the_package_with_its_own_settings() -> None:
    workloads = [d for d in documents() if d["kind"] in ("Deployment", "DaemonSet")]
    assert {w["metadata"]["name"] for w in workloads} == {
        "gpumeter-agent",
        "gpumeter-metering",
        "gpumeter-billing",
        "gpumeter-alerts",
    }
    shared = config_keys("ConfigMap") | config_keys("Secret")
    for workload in workloads:
        [container] = workload["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "gpumeter:latest"
        command = container["command"]
        assert command[:2] == ["python", "-m"] and importlib.util.find_spec(command[2]), command
        known = settings_fields(command[2]) | PLATFORM_ENV
        if command[2] == "services.alerts":
            known |= rules_file_env_names()
        names = {env["name"] for env in container.get("env", [])}
        assert not names - known, f"{workload['metadata']['name']}: {sorted(names - known)}"
        if container.get("envFrom"):
            assert not config_keys("ConfigMap") - known, "ConfigMap keys that are no setting"
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in shared


def test_the_agent_daemonset_runs_on_gpu_nodes_with_nvml() -> None:
    [agent] = [d for d in documents() if d["kind"] == "DaemonSet"]
    spec = agent["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_grafana_panels_query_metrics_the_services_export() -> None:
    sources = "".join(p.read_text() for p in (DEPLOY.parent / "services").rglob("*.py"))
    exported = set(re.findall(r'"((?:gpumeter|billing|alerts)_[a-z_]+)"', sources))
    dashboard = json.loads((DEPLOY / "grafana" / "gpumeter-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for metric in re.findall(r"\b((?:gpumeter|billing|alerts)_[a-z_]+)", target["expr"]):
                base = re.sub(r"_(total|bucket|sum|count)$", "", metric)
                assert metric in exported or base in exported, (
                    f"{panel['title']}: {metric} is not exported"
                )


def test_prometheus_and_alertmanager_examples_parse() -> None:
    assert yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    assert yaml.safe_load((DEPLOY / "alertmanager-route.example.yml").read_text())["route"][
        "receiver"
    ]


def test_every_workload_reaches_kafka_over_sasl_ssl_with_a_user_of_its_own() -> None:
    config = next(d for d in documents() if d["kind"] == "ConfigMap")["data"]
    assert config["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert config["KAFKA_SASL_MECHANISM"].startswith("SCRAM-")
    ca_dir = str(Path(config["KAFKA_SSL_CAFILE"]).parent)
    users = set()
    for workload in (d for d in documents() if d["kind"] in ("Deployment", "DaemonSet")):
        spec = workload["spec"]["template"]["spec"]
        [container] = spec["containers"]
        env = {e["name"]: e for e in container["env"]}
        users.add(env["KAFKA_SASL_USERNAME"]["value"])
        assert env["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "gpumeter-secrets"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert mounts["kafka-ca"] == ca_dir
        assert volumes["kafka-ca"]["secret"]["secretName"] == "gpumeter-kafka-ca"
    assert len(users) == 4  # one Kafka user per workload


def test_no_secret_has_a_value_in_the_repository() -> None:
    [secret] = [d for d in documents() if d["kind"] == "Secret"]
    assert all(value == "" for value in secret["stringData"].values())
    compose = (DEPLOY.parent / "docker-compose.yml").read_text()
    assert "${POSTGRES_PASSWORD:?" in compose and "${API_TOKENS:?" in compose
    assert not re.search(r"POSTGRES_PASSWORD:\s*\w", compose)
    assert not re.search(r"postgresql://\w+:\w+@", compose)
