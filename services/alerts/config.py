"""The rules file (deploy/alert-rules.yaml): rules, receivers and routes, validated at start-up.

Every problem in the file is reported at once, so one edit fixes them all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.alerts.domain import Route, Rule, parse_duration

PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
KAFKA_RECEIVER = "kafka"  # the alerts.v1 topic rides the same outbox; the name is reserved

ReceiverType = Literal["webhook", "alertmanager", "slack", "pagerduty"]


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid alert rules file:\n  " + "\n  ".join(problems))
        self.problems = problems


class RuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    signal: str
    op: Literal[">=", "<=", ">", "<"] = ">="
    threshold: Decimal
    clear_threshold: Decimal | None = None
    for_: str | float = Field("0s", alias="for")
    keep_firing_for: str | float = "0s"
    repeat_interval: str | float | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class ReceiverSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    type: ReceiverType
    url: str | None = None
    url_env: str | None = None
    routing_key: str | None = None  # pagerduty
    routing_key_env: str | None = None
    send_resolved: bool = True


class RouteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    receivers: list[str] = Field(min_length=1)
    match: dict[str, str] = Field(default_factory=dict)
    match_re: dict[str, str] = Field(default_factory=dict)
    continue_: bool = Field(False, alias="continue")


class RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[RuleSpec] = Field(default_factory=list)
    receivers: list[ReceiverSpec] = Field(default_factory=list)
    routes: list[RouteSpec] = Field(default_factory=list)


@dataclass(frozen=True)
class ReceiverConfig:
    name: str
    type: ReceiverType
    url: str
    routing_key: str | None = None
    send_resolved: bool = True


@dataclass(frozen=True)
class AlertConfig:
    rules: list[Rule]
    receivers: dict[str, ReceiverConfig]  # enabled receivers only
    routes: list[Route]
    disabled: dict[str, str]  # receiver name -> why


def load(path: Path, env: Callable[[str], str | None]) -> AlertConfig:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    return parse(document or {}, env, source=str(path))


def parse(document: Any, env: Callable[[str], str | None], source: str = "rules") -> AlertConfig:
    try:
        spec = RulesFile.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(
            [f"{source}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        ) from None
    problems: list[str] = []
    rules = []
    for rule_spec in spec.rules:

        def duration(field: str, text: str | float, name: str = rule_spec.name) -> timedelta:
            try:
                return parse_duration(text)
            except ValueError as exc:
                problems.append(f"rule {name}: {field}: {exc}")
                return timedelta(0)

        repeat = rule_spec.repeat_interval
        rule = Rule(
            name=rule_spec.name,
            signal=rule_spec.signal,
            op=rule_spec.op,
            threshold=rule_spec.threshold,
            clear_threshold=rule_spec.clear_threshold,
            for_=duration("for", rule_spec.for_),
            keep_firing_for=duration("keep_firing_for", rule_spec.keep_firing_for),
            repeat_interval=None if repeat is None else duration("repeat_interval", repeat),
            labels=rule_spec.labels,
            annotations=rule_spec.annotations,
        )
        problems.extend(rule.problems())
        rules.append(rule)
    names = [rule.name for rule in rules]
    problems.extend(
        f"rule {name} appears twice" for name in sorted({n for n in names if names.count(n) > 1})
    )

    receivers: dict[str, ReceiverConfig] = {}
    disabled: dict[str, str] = {}
    declared = [r.name for r in spec.receivers]
    for name in sorted({n for n in declared if declared.count(n) > 1}):
        problems.append(f"receiver {name} appears twice")
    for receiver in spec.receivers:
        if receiver.name == KAFKA_RECEIVER:
            problems.append(f"receiver name {KAFKA_RECEIVER!r} is reserved for the alerts topic")
            continue
        url = receiver.url or (env(receiver.url_env) if receiver.url_env else None)
        if url is None and receiver.type == "pagerduty":
            url = PAGERDUTY_EVENTS_URL
        routing_key = receiver.routing_key or (
            env(receiver.routing_key_env) if receiver.routing_key_env else None
        )
        if url is None:
            if not receiver.url_env:
                problems.append(f"receiver {receiver.name}: needs url or url_env")
            else:
                disabled[receiver.name] = f"environment variable {receiver.url_env} is not set"
            continue
        if receiver.type == "pagerduty" and routing_key is None:
            if not receiver.routing_key_env:
                problems.append(f"receiver {receiver.name}: needs routing_key or routing_key_env")
            else:
                disabled[receiver.name] = (
                    f"environment variable {receiver.routing_key_env} is not set"
                )
            continue
        receivers[receiver.name] = ReceiverConfig(
            receiver.name,
            receiver.type,
            url.rstrip("/") if receiver.type == "alertmanager" else url,
            routing_key,
            receiver.send_resolved,
        )

    routes = []
    for index, route_spec in enumerate(spec.routes):
        unknown = [n for n in route_spec.receivers if n not in declared]
        if unknown:
            problems.append(f"routes[{index}]: unknown receivers {', '.join(unknown)}")
        for label, pattern in route_spec.match_re.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"routes[{index}].match_re.{label}: {exc}")
        routes.append(
            Route(
                receivers=tuple(n for n in route_spec.receivers if n in receivers),
                match=route_spec.match,
                match_re=route_spec.match_re,
                continue_=route_spec.continue_,
            )
        )
    if problems:
        raise ConfigError(problems)
    return AlertConfig(rules=rules, receivers=receivers, routes=routes, disabled=disabled)
