"""Billing settings, read once from the environment and validated at start-up."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import Field, field_validator

from services.common.auth import (  # noqa: F401 - the billing API's names for them
    PROJECT_ROLE_PREFIX,
    ROLE_ADMIN,
    ROLE_BILLING,
    Role,
    parse_api_tokens,
)
from services.common.settings import ApiTokenSettings


class BillingSettings(ApiTokenSettings):
    database_url: str = "postgresql://postgres@127.0.0.1:5432/gpumeter"
    http_port: int = Field(8080, ge=0, le=65535)
    topic_partitions: int = Field(4, ge=1, description="partitions of topics billing creates")
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="the largest request body taken (a catalog), else 413"
    )
    consumer_max_records: int = Field(1000, ge=1)
    database_pool_size: int = Field(5, ge=2)
    publish_interval_s: float = Field(
        2.0, gt=0, description="how often unpublished invoices are retried"
    )
    db_retry_max_backoff_s: float = Field(5.0, gt=0)
    provider_name: str = Field(
        "gpumeter",
        min_length=1,
        description="ProviderName, PublisherName and InvoiceIssuerName of the FOCUS export",
    )
    issuer_name: str = Field(
        "Cyberport AI Supercomputing Centre",
        min_length=1,
        max_length=200,
        description="the centre's name as the issuer of invoices and credit notes",
    )
    issuer_address: str = Field(
        "",
        max_length=1000,
        description="the issuer's postal address; lines separated by '|' or newlines",
    )
    issuer_business_registration: str | None = Field(
        None, max_length=50, description="the issuer's Business Registration number (BR No.)"
    )
    issuer_email: str | None = Field(None, max_length=254)
    invoice_number_prefix: str = Field(
        "AISC",
        pattern=r"^[A-Z][A-Z0-9]{0,9}$",
        description="invoice numbers are PREFIX-YYYY-NNNNNN, credit notes PREFIX-CN-YYYY-NNNNNN",
    )
    payment_terms_days: int = Field(30, ge=0, le=365, description="due date = issue date + this")
    slurm_sacct: str | None = Field(
        None,
        description="the sacct command for reconciling metered GPU-hours with Slurm's accounting"
        " (SLURM_CONF in the environment names the cluster); unset: reconciliation is off",
    )
    reconcile_tolerance_pct: Decimal = Field(
        Decimal(2), ge=0, description="a job differs when off by more than this percentage ..."
    )
    reconcile_tolerance_gpu_seconds: Decimal = Field(
        Decimal(120), ge=0, description="... and by more than this many GPU-seconds"
    )
    enforcement_mode: Literal["off", "dry-run", "apply"] = Field(
        "dry-run",
        description="projects with on_cap_exhausted: hold: off, dry-run (decide, record, audit;"
        " no sacctmgr) or apply (sacctmgr sets the Slurm account's GrpTRESMins)",
    )
    slurm_sacctmgr: str = Field("sacctmgr", description="the sacctmgr command for `apply`")
    enforcement_interval_s: float = Field(60.0, gt=0)
    alerts_url: str | None = Field(
        None,
        description="base URL of the alerts service (its GET /v1/alerts feeds the dashboard's"
        " active alerts); unset: the dashboard says alerts are not configured",
    )

    @field_validator("alerts_url", mode="before")
    @classmethod
    def _alerts_url(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().rstrip("/")
            if not value:
                return None
            if not value.startswith(("http://", "https://")):
                raise ValueError("ALERTS_URL: expected an http:// or https:// URL")
        return value

    @property
    def issuer_address_lines(self) -> tuple[str, ...]:
        lines = self.issuer_address.replace("|", "\n").splitlines()
        return tuple(line.strip() for line in lines if line.strip())

    @property
    def consumer_group(self) -> str:
        return self.group("billing")
