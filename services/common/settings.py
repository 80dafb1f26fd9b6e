"""Settings every service shares, read once from the environment (no prefix: contract names)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.topics import Topics
from services.common.auth import Role, parse_api_tokens, weak_tokens


class CommonSettings(BaseSettings):
    # A setting that fails validation is named with the reason, never echoed: API_TOKENS and
    # DATABASE_URL hold secrets, and the error goes to logs.
    model_config = SettingsConfigDict(
        env_prefix="", extra="ignore", case_sensitive=False, hide_input_in_errors=True
    )

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = Field("", description="prepended to every topic, consumer group and app id")
    # Tansu holds a group's first join for the rebalance timeout: local profiles set a few seconds.
    kafka_rebalance_timeout_ms: int = 30000
    kafka_session_timeout_ms: int = 10000
    kafka_heartbeat_interval_ms: int = 1000
    # Which broker this is, where Tansu's answers differ from Apache Kafka's: `auto` asks the broker
    # (services.common.kafka_admin.broker_kind); workarounds for Tansu are off on Kafka only.
    kafka_broker: Literal["auto", "kafka", "tansu"] = "auto"
    # Copies of each topic the services create: 3 on a production cluster (min.insync.replicas=2
    # there; every producer sends with acks=all).
    kafka_replication_factor: int = Field(1, ge=1)
    http_host: str = "127.0.0.1"
    log_level: str = "INFO"

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def group(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def consumer_kwargs(self) -> dict[str, Any]:
        """aiokafka consumer options for a group member (offsets committed by the caller)."""
        return {
            "bootstrap_servers": self.kafka_bootstrap_servers,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "rebalance_timeout_ms": self.kafka_rebalance_timeout_ms,
            "session_timeout_ms": self.kafka_session_timeout_ms,
            "heartbeat_interval_ms": self.kafka_heartbeat_interval_ms,
        }


class ApiTokenSettings(CommonSettings):
    """API_TOKENS for a service with an HTTP API (billing, alerts): the same list for both."""

    api_tokens: Annotated[dict[str, Role], NoDecode] = Field(
        default_factory=dict,
        description="TOKEN=ROLE pairs separated by commas; roles admin, billing, project:<id>",
    )
    # A service refuses to start with a token under 32 characters or a well-known default unless
    # this is set: for development and tests only.
    allow_insecure_tokens: bool = False

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _parse_tokens(cls, value: object) -> object:
        return parse_api_tokens(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _strong_tokens(self) -> ApiTokenSettings:
        weak = weak_tokens(self.api_tokens)
        if weak and not self.allow_insecure_tokens:
            raise ValueError(
                "API_TOKENS: "
                + "; ".join(weak)
                + ". Use long random tokens (python -c 'import secrets; print(secrets.token_urlsafe(32))'),"
                " or ALLOW_INSECURE_TOKENS=true for development only"
            )
        return self
