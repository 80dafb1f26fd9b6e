"""How every Kafka client of gpumeter reaches a broker that requires TLS and SASL: one set of
settings (the usual names: KAFKA_SECURITY_PROTOCOL, KAFKA_SSL_CAFILE, KAFKA_SASL_MECHANISM, ...)
turned into the options of each client library: aiokafka (billing, alerts, the admin helper),
Faust (metering) and kafka-python (the node agent).

Anyone who can write to the broker can rewrite any project's hourly totals, so the broker's own
authentication is part of gpumeter's: production clusters listen with SASL_SSL.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any, Literal

Protocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
Mechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@dataclass(frozen=True)
class KafkaSecurity:
    protocol: Protocol = "PLAINTEXT"
    cafile: str | None = None
    certfile: str | None = None  # a client certificate, where the broker asks for one (mTLS)
    keyfile: str | None = None
    key_password: str | None = field(default=None, repr=False)
    check_hostname: bool = True
    mechanism: Mechanism | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def problems(self) -> list[str]:
        """What is missing or contradictory, by setting name, never echoing a secret."""
        found = []
        if self.uses_sasl:
            if self.mechanism is None:
                found.append("KAFKA_SASL_MECHANISM: required with " + self.protocol)
            if not self.username or not self.password:
                found.append(
                    "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD: required with " + self.protocol
                )
        elif self.mechanism or self.username or self.password:
            found.append(
                f"KAFKA_SASL_*: set, but KAFKA_SECURITY_PROTOCOL is {self.protocol} (SASL_SSL?)"
            )
        if not self.uses_tls and (self.cafile or self.certfile or self.keyfile):
            found.append(
                f"KAFKA_SSL_*: set, but KAFKA_SECURITY_PROTOCOL is {self.protocol} (SSL or SASL_SSL?)"
            )
        if bool(self.certfile) != bool(self.keyfile):
            found.append("KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE: set both or neither")
        return found

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context (the CA file, or the system's CAs without one); None without TLS.
        Reading a missing or malformed file fails here, at start-up, naming the setting."""
        if not self.uses_tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        try:
            if self.cafile:
                context.load_verify_locations(cafile=self.cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"KAFKA_SSL_CAFILE: cannot be read as PEM CA certificates ({exc})"
            ) from None
        try:
            if self.certfile:
                context.load_cert_chain(self.certfile, self.keyfile, self.key_password)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"KAFKA_SSL_CERTFILE/KAFKA_SSL_KEYFILE: cannot be loaded ({exc})"
            ) from None
        context.check_hostname = self.check_hostname
        return context

    def aiokafka(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's clients (producer, consumer, admin) and for
        kafka-python's KafkaProducer (the node agent), which name them alike. The hostname check
        travels in the context: kafka-python ignores `ssl_check_hostname` beside an ssl_context."""
        if self.protocol == "PLAINTEXT":
            return {}
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_tls:
            options["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            options.update(
                sasl_mechanism=self.mechanism,
                sasl_plain_username=self.username,
                sasl_plain_password=self.password,
            )
        return options

    def faust_credentials(self) -> Any:
        """Faust's `broker_credentials` (None for PLAINTEXT)."""
        import faust
        from faust.types.auth import AuthProtocol, SASLMechanism

        if self.protocol == "PLAINTEXT":
            return None
        if not self.uses_sasl:
            return faust.SSLCredentials(self.ssl_context())
        credentials = faust.SASLCredentials(
            username=self.username,
            password=self.password,
            ssl_context=self.ssl_context(),
            mechanism=SASLMechanism(self.mechanism),
        )
        if not self.uses_tls:
            credentials.protocol = AuthProtocol.SASL_PLAINTEXT
        return credentials
