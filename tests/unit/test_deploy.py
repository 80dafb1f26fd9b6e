"""docker-compose.yml cannot run here (no Docker engine): check it parses and names real things."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]


def settings_fields(module_name: str) -> set[str]:
    module = importlib.import_module(f"{module_name}.settings")
    fields: set[str] = set()
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if issubclass(cls, BaseSettings) and cls.__module__ == module.__name__:
            for name, field in cls.model_fields.items():
                fields.add(name.upper())
                if isinstance(field.validation_alias, str):
                    fields.add(field.validation_alias.upper())
    return fields


def rules_file_env_names() -> set[str]:
    """Receiver URLs and keys the alert rules file reads from the environment."""
    text = (ROOT / "deploy" / "alert-rules.yaml").read_text()
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_env") and isinstance(value, str):
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(text))
    return found


def test_compose_file_parses_and_every_command_is_a_module_of_the_package() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    ours = {name: spec for name, spec in compose["services"].items() if "build" in spec}
    assert {"metering", "billing", "alerts", "agent"} <= set(ours)
    for name, spec in ours.items():
        command = spec["command"]
        assert command[:2] == ["python", "-m"], name
        assert importlib.util.find_spec(command[2]) is not None, f"{name}: no module {command[2]}"
        if len(command) > 3 and command[3] == "catalog":
            assert (ROOT / command[5]).exists(), f"{name}: {command[5]} missing"


def test_every_environment_variable_in_compose_is_a_setting_of_that_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, spec in compose["services"].items():
        if "build" not in spec:
            continue
        module = spec["command"][2]
        known = settings_fields(module) | (
            rules_file_env_names() if module == "services.alerts" else set()
        )
        unknown = set(spec.get("environment", {})) - known
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of {module}"


def test_kafka_runs_in_kraft_mode_with_one_node() -> None:
    kafka = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_compose_and_k8s_name_the_kafka_version_the_tests_run() -> None:
    from gpumeter.kafkabroker import KAFKA_VERSION

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
    k8s = (ROOT / "deploy" / "k8s" / "config.yaml").read_text()
    assert f"Apache Kafka {KAFKA_VERSION} is the version the tests run" in k8s


# What each service's __main__ builds from its environment (the catalog job runs billing's CLI).
SETTINGS_OF = {
    "services.metering": "services.metering.settings:MeteringSettings",
    "services.billing": "services.billing.settings:BillingSettings",
    "services.alerts": "services.alerts.settings:AlertsSettings",
    "services.agent": "services.agent.settings:AgentSettings",
}
# Stand-ins for the variables compose requires (`${VAR:?message}`): a deployment sets its own.
REQUIRED = {"POSTGRES_PASSWORD": "pw", "API_TOKENS": "a" * 40 + "=admin"}


def with_compose_defaults(value: object) -> str:
    """`${VAR:-default}` -> default, `${VAR:?message}` -> a stand-in, as compose with none set."""

    def substitute(match: re.Match[str]) -> str:
        name, kind, default = match.groups()
        return REQUIRED[name] if kind == ":?" else default

    return re.sub(r"\$\{(\w+)(:-|:\?)([^}]*)\}", substitute, str(value))


def test_every_service_starts_with_the_compose_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose passes `KAFKA_SASL_MECHANISM: ${KAFKA_SASL_MECHANISM:-}` as an empty string: it
    must read as unset, not as a mechanism named ''."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, spec in compose["services"].items():
        if "build" not in spec:
            continue
        for variable in list(os.environ):  # this service's compose environment, nothing else
            monkeypatch.delenv(variable)
        for variable, value in spec.get("environment", {}).items():
            monkeypatch.setenv(variable, with_compose_defaults(value))
        module, _, cls = SETTINGS_OF[spec["command"][2]].partition(":")
        settings_class = getattr(importlib.import_module(module), cls)
        try:
            settings_class()
        except ValidationError as exc:
            pytest.fail(f"{name}: {exc}")
        monkeypatch.undo()
