"""Catalog files (docs/contracts.md §3): load with errors that name the bad field, apply
idempotently."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import yaml
from pydantic import ValidationError

from schemas.catalog import Catalog, Project, RateCard
from services.billing import service, store
from services.billing.store import Connection


class CatalogError(ValueError):
    """A catalog file that cannot be read or does not validate; `errors` lists every problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(errors))
        self.source = source
        self.errors = errors


def format_location(location: tuple[int | str, ...]) -> str:
    """('rate_cards', 2, 'hkd_per_gpu_hour') -> 'rate_cards[2].hkd_per_gpu_hour'."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(catalog)"


def describe_validation_error(exc: ValidationError) -> list[str]:
    return [f"{format_location(tuple(error['loc']))}: {error['msg']}" for error in exc.errors()]


class _CatalogLoader(yaml.SafeLoader):
    """SafeLoader that leaves dates as text, so a bad date is reported with its field's name."""


_CatalogLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_catalog(text: str, source: str = "catalog") -> Catalog:
    """YAML (or JSON, which is YAML) text -> Catalog, or CatalogError listing every problem."""
    try:
        document = yaml.load(text, Loader=_CatalogLoader)  # a SafeLoader subclass
    except (yaml.YAMLError, ValueError) as exc:
        raise CatalogError(source, [f"not valid YAML: {exc}"]) from None
    if not isinstance(document, dict):
        raise CatalogError(source, ["expected a mapping with currency, rate_cards and projects"])
    try:
        return Catalog.model_validate(document)
    except ValidationError as exc:
        raise CatalogError(source, describe_validation_error(exc)) from None


def load_catalog_file(path: str | Path) -> Catalog:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(str(path), [f"cannot read the file: {exc}"]) from None
    return parse_catalog(text, str(path))


@dataclass
class CatalogChanges:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    invoices_changed: list[str] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    def summary(self) -> str:
        if not self.any:
            return f"catalog unchanged ({self.unchanged} entries)"
        parts = [
            f"{len(self.added)} added",
            f"{len(self.changed)} changed",
            f"{len(self.removed)} removed",
            f"{self.unchanged} unchanged",
            f"{len(self.invoices_changed)} draft invoices recomputed",
        ]
        return "catalog applied: " + ", ".join(parts)


def card_name(card: RateCard) -> str:
    return f"rate card {card.gpu_model} from {card.effective_from.isoformat()}"


async def apply_catalog(
    conn_or_dsn: Connection | str,
    catalog: Catalog,
    prune: bool = False,
    actor: str = "system",
) -> CatalogChanges:
    """Upsert rate cards and projects; entries missing from the file are kept unless `prune`.

    Applying the same catalog twice changes nothing. Draft invoices are recomputed when it changes,
    and the change (each entry before and after) goes to the audit trail as `actor`'s.
    """
    if isinstance(conn_or_dsn, str):
        conn = await asyncpg.connect(conn_or_dsn)
        try:
            return await _apply(conn, catalog, prune, actor)
        finally:
            await conn.close()
    return await _apply(conn_or_dsn, catalog, prune, actor)


def _entry(value: RateCard | Project | None) -> Any:
    return None if value is None else value.model_dump(mode="json", exclude_none=True)


MAX_STORED_AMOUNT = Decimal("1e16")  # numeric(18,2) holds amounts below 10^16


def storable_text(text: str) -> bool:
    """PostgreSQL text holds UTF-8 without NUL characters."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def check_storable(catalog: Catalog, source: str = "catalog") -> None:
    """Refuse, listing every problem, values the schema allows but the database cannot store."""
    errors = []
    for index, card in enumerate(catalog.rate_cards):
        if card.hkd_per_gpu_hour >= MAX_STORED_AMOUNT:
            errors.append(f"rate_cards[{index}].hkd_per_gpu_hour: must be below 10^16")
        if not storable_text(card.gpu_model):
            errors.append(f"rate_cards[{index}].gpu_model: NUL or invalid Unicode")
    for index, project in enumerate(catalog.projects):
        if not storable_text(project.name):
            errors.append(f"projects[{index}].name: NUL or invalid Unicode")
        if project.bill_to is not None:
            bill_to = project.bill_to
            texts = [bill_to.contact, bill_to.email, bill_to.purchase_order, *bill_to.address]
            if not all(storable_text(text) for text in texts if text is not None):
                errors.append(f"projects[{index}].bill_to: NUL or invalid Unicode")
        subsidy = project.subsidy
        if subsidy is None:
            continue
        if subsidy.cap_hkd >= MAX_STORED_AMOUNT:
            errors.append(f"projects[{index}].subsidy.cap_hkd: must be below 10^16")
        if not storable_text(subsidy.scheme):
            errors.append(f"projects[{index}].subsidy.scheme: NUL or invalid Unicode")
    if errors:
        raise CatalogError(source, errors)


async def _apply(conn: Any, catalog: Catalog, prune: bool, actor: str) -> CatalogChanges:
    check_storable(catalog)
    changes = CatalogChanges()
    diff: list[dict[str, Any]] = []  # what changed, for the audit trail
    async with conn.transaction():
        await store.lock_writes(conn)
        cards = {(c.gpu_model, c.effective_from): c for c in await store.rate_cards(conn)}
        for card in catalog.rate_cards:
            current = cards.pop((card.gpu_model, card.effective_from), None)
            if current == card:
                changes.unchanged += 1
                continue
            await store.upsert_rate_card(conn, card)
            (changes.added if current is None else changes.changed).append(card_name(card))
            diff.append(
                {"entry": card_name(card), "before": _entry(current), "after": _entry(card)}
            )
        projects: dict[str, Project] = {p.id: p for p in await store.projects(conn)}
        for project in catalog.projects:
            current_project = projects.pop(project.id, None)
            if current_project == project:
                changes.unchanged += 1
                continue
            await store.upsert_project(conn, project)
            target = changes.added if current_project is None else changes.changed
            target.append(f"project {project.id}")
            diff.append(
                {
                    "entry": f"project {project.id}",
                    "before": _entry(current_project),
                    "after": _entry(project),
                }
            )
        if prune:
            for card in cards.values():
                await store.delete_rate_card(conn, card)
                changes.removed.append(card_name(card))
                diff.append({"entry": card_name(card), "before": _entry(card), "after": None})
            for project_id, removed in projects.items():
                await store.delete_project(conn, project_id)
                changes.removed.append(f"project {project_id}")
                diff.append(
                    {"entry": f"project {project_id}", "before": _entry(removed), "after": None}
                )
        if changes.any:
            changes.invoices_changed = await service.recompute_all_drafts(conn)
            await store.record_audit(
                conn,
                actor,
                "catalog.apply",
                None,
                {
                    "summary": changes.summary(),
                    "prune": prune,
                    "changes": diff,
                    "invoices_changed": len(changes.invoices_changed),
                },
            )
    return changes


async def read_catalog(conn: Connection) -> Catalog:
    projects = await store.projects(conn)
    return Catalog(
        version=2 if any(project.bill_to is not None for project in projects) else 1,
        currency="HKD",
        rate_cards=await store.rate_cards(conn),
        projects=projects,
    )
