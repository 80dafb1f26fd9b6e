"""JSON Schema files generated from the models; `python -m schemas.jsonschema` rewrites them."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.alert import AlertEvent
from schemas.billing import SlurmHold, SubsidyUsage, UnpricedUsage
from schemas.catalog import Catalog
from schemas.dead_letter import DeadLetter
from schemas.invoice import CreditNote, Invoice
from schemas.metering import ClusterMinute, HourCompleteness, HourlyTotal, JobHourlyTotal
from schemas.usage import UsageEvent

SCHEMA_DIR = Path(__file__).parent / "json"

MODELS: dict[str, type[BaseModel]] = {
    "usage-event.v1": UsageEvent,
    "dead-letter.v1": DeadLetter,
    "hourly-total.v1": HourlyTotal,
    "job-hourly-total.v1": JobHourlyTotal,
    "cluster-minute.v1": ClusterMinute,
    "hour-completeness.v1": HourCompleteness,
    "catalog": Catalog,
    "invoice.v1": Invoice,
    "credit-note.v1": CreditNote,
    "alert-event.v1": AlertEvent,
    "subsidy-usage.v1": SubsidyUsage,
    "slurm-hold.v1": SlurmHold,
    "unpriced-usage.v1": UnpricedUsage,
}


def render() -> dict[str, str]:
    return {
        f"{name}.schema.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True)
        + "\n"
        for name, model in MODELS.items()
    }


def write() -> None:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for filename, text in render().items():
        (SCHEMA_DIR / filename).write_text(text)


if __name__ == "__main__":
    write()
