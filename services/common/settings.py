"""Settings every service shares, read once from the environment (no prefix: contract names)."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.topics import Topics
from services.common.auth import Authenticator, Role, parse_api_tokens, weak_tokens
from services.common.kafka_security import KafkaSecurity


def _https_or_local(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme == "https" or (
        parts.scheme == "http" and parts.hostname in ("localhost", "127.0.0.1", "::1")
    )


class CommonSettings(BaseSettings):
    # A setting that fails validation is named with the reason, never echoed: API_TOKENS and
    # DATABASE_URL hold secrets, and the error goes to logs. A variable set to "" counts as unset
    # (its default): compose passes `${KAFKA_SASL_MECHANISM:-}` and the like through empty.
    model_config = SettingsConfigDict(
        env_prefix="",
        extra="ignore",
        case_sensitive=False,
        hide_input_in_errors=True,
        env_ignore_empty=True,
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
    # How every Kafka client connects (services/common/kafka_security.py): PLAINTEXT locally;
    # SSL or SASL_SSL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) on a production cluster.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_ssl_password: SecretStr | None = None
    kafka_ssl_check_hostname: bool = True
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None

    @model_validator(mode="after")
    def _kafka_security_complete(self) -> CommonSettings:
        security = self.kafka_security
        problems = security.problems()
        if problems:
            raise ValueError("; ".join(problems))
        security.ssl_context()  # the CA and key files are read now, not at the first connection
        return self

    @property
    def kafka_security(self) -> KafkaSecurity:
        return KafkaSecurity(
            protocol=self.kafka_security_protocol,
            cafile=self.kafka_ssl_cafile,
            certfile=self.kafka_ssl_certfile,
            keyfile=self.kafka_ssl_keyfile,
            key_password=(
                self.kafka_ssl_password.get_secret_value() if self.kafka_ssl_password else None
            ),
            check_hostname=self.kafka_ssl_check_hostname,
            mechanism=self.kafka_sasl_mechanism,
            username=self.kafka_sasl_username,
            password=(
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
            ),
        )

    def kafka_options(self) -> dict[str, Any]:
        """The broker and its security, as keyword arguments of any aiokafka client."""
        return {
            "bootstrap_servers": self.kafka_bootstrap_servers,
            **self.kafka_security.aiokafka(),
        }

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def group(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def consumer_kwargs(self) -> dict[str, Any]:
        """aiokafka consumer options for a group member (offsets committed by the caller)."""
        return {
            **self.kafka_options(),
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
    # /metrics answers only a valid bearer token (any role) when set; /healthz stays open for
    # probes. Prometheus sends one with `authorization: {credentials: ...}` in its scrape config.
    metrics_require_token: bool = False
    # OpenID Connect (services/common/oidc.py): JWTs from the centre's identity provider are
    # accepted beside API_TOKENS when OIDC_ISSUER is set.
    oidc_issuer: str = ""
    oidc_audience: str = ""
    # Where the provider's signing keys are; default: `jwks_uri` of the issuer's
    # /.well-known/openid-configuration, read at the first token.
    oidc_jwks_url: str = ""
    oidc_roles_claim: str = "groups"
    # The dashboard's "Sign in" (authorization code with PKCE, a public client): its client id at
    # the provider (default OIDC_AUDIENCE) and the scopes it asks for.
    oidc_client_id: str = ""
    oidc_scopes: str = "openid profile"
    oidc_role_map: Annotated[dict[str, Role], NoDecode] = Field(
        default_factory=dict,
        description="GROUP=ROLE pairs; a GROUP ending in * matches by prefix, project:* takes the rest",
    )
    oidc_algorithms: Annotated[tuple[str, ...], NoDecode] = ("RS256", "ES256")
    oidc_leeway_s: float = Field(30.0, ge=0, le=300)
    oidc_jwks_refresh_min_s: float = Field(30.0, ge=0)
    oidc_jwks_max_age_s: float = Field(3600.0, gt=0)

    @field_validator("oidc_role_map", mode="before")
    @classmethod
    def _parse_role_map(cls, value: object) -> object:
        from services.common.oidc import parse_role_map

        return parse_role_map(value) if isinstance(value, str) else value

    @field_validator("oidc_algorithms", mode="before")
    @classmethod
    def _parse_algorithms(cls, value: object) -> object:
        from services.common.oidc import check_algorithms

        if isinstance(value, str):
            value = tuple(a.strip() for a in value.split(",") if a.strip())
        return check_algorithms(value) if isinstance(value, tuple) else value

    @model_validator(mode="after")
    def _metrics_token_possible(self) -> ApiTokenSettings:
        if self.metrics_require_token and not self.api_tokens and not self.oidc_issuer:
            raise ValueError(
                "METRICS_REQUIRE_TOKEN: set, but neither API_TOKENS nor OIDC_ISSUER is, so no "
                "scrape could be let in; set one of them, or unset METRICS_REQUIRE_TOKEN"
            )
        return self

    @model_validator(mode="after")
    def _oidc_complete(self) -> ApiTokenSettings:
        if not self.oidc_issuer:
            return self
        if not self.oidc_audience:
            raise ValueError("OIDC_AUDIENCE: required with OIDC_ISSUER (this service's client id)")
        if not self.oidc_role_map:
            raise ValueError(
                "OIDC_ROLE_MAP: required with OIDC_ISSUER (which groups get which role)"
            )
        for name, url in (("OIDC_ISSUER", self.oidc_issuer), ("OIDC_JWKS_URL", self.oidc_jwks_url)):
            if url and not _https_or_local(url) and not self.allow_insecure_tokens:
                raise ValueError(f"{name}: https:// required (http only to localhost)")
        return self

    def warn_if_insecure(self, log: logging.Logger) -> None:
        """Say so at start-up when ALLOW_INSECURE_TOKENS let weak tokens or an http:// identity
        provider through: a development switch must not go unnoticed in production."""
        if not self.allow_insecure_tokens:
            return
        weak = weak_tokens(self.api_tokens)
        log.warning(
            "ALLOW_INSECURE_TOKENS is set (development only)%s",
            f": accepting {len(weak)} weak token(s): " + "; ".join(weak) if weak else "",
        )

    def authenticator(self) -> Authenticator:
        from services.common.oidc import OidcConfig, OidcVerifier

        oidc = None
        if self.oidc_issuer:
            oidc = OidcVerifier(
                OidcConfig(
                    issuer=self.oidc_issuer,
                    audience=self.oidc_audience,
                    jwks_url=self.oidc_jwks_url,
                    roles_claim=self.oidc_roles_claim,
                    role_map=dict(self.oidc_role_map),
                    algorithms=tuple(self.oidc_algorithms),
                    leeway_s=self.oidc_leeway_s,
                    jwks_refresh_min_s=self.oidc_jwks_refresh_min_s,
                    jwks_max_age_s=self.oidc_jwks_max_age_s,
                )
            )
        return Authenticator(self.api_tokens, oidc)

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
