"""Billing commands against DATABASE_URL: catalog apply, invoices list/show/export, periods finalize.

Routed from `gpumeter ...` and `python -m services.billing ...`; migrations run first.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

import asyncpg
from pydantic import ValidationError

from schemas.catalog import Project
from schemas.invoice import CreditNote, Invoice
from services.billing import catalog as catalog_files
from services.billing import domain, service, store
from services.billing.export import focus_csv, invoices_csv
from services.billing.settings import BillingSettings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CommandFailed(Exception):
    """An expected failure: printed as one message, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpumeter", description="gpumeter billing commands (database from DATABASE_URL)"
    )
    groups = parser.add_subparsers(dest="group", required=True)

    catalog = groups.add_parser("catalog", help="rate cards, projects, subsidy approvals")
    catalog_commands = catalog.add_subparsers(dest="command", required=True)
    apply = catalog_commands.add_parser("apply", help="apply a catalog file (YAML or JSON)")
    apply.add_argument("file", type=Path)
    apply.add_argument("--prune", action="store_true", help="delete entries the file omits")
    apply.add_argument("--check", action="store_true", help="only validate the file")
    catalog_commands.add_parser("show", help="print the catalog in the database as JSON")

    invoices = groups.add_parser("invoices", help="read invoices")
    invoice_commands = invoices.add_subparsers(dest="command", required=True)
    listing = invoice_commands.add_parser("list", help="one line per invoice of a period")
    listing.add_argument("--period", required=True, help="YYYY-MM (Asia/Hong_Kong month)")
    listing.add_argument("--project", help="only this project")
    show = invoice_commands.add_parser("show", help="print one invoice as JSON")
    show.add_argument("invoice_id")
    export = invoice_commands.add_parser(
        "export", help="all invoices of a period as CSV, JSON or FinOps FOCUS CSV"
    )
    export.add_argument("--period", required=True, help="YYYY-MM")
    export.add_argument("--format", choices=("csv", "json", "focus"), default="csv")
    export.add_argument("--project", help="only this project")
    export.add_argument("--out", type=Path, help="file to write (default: standard output)")

    periods = groups.add_parser("periods", help="billing periods")
    period_commands = periods.add_subparsers(dest="command", required=True)
    finalize = period_commands.add_parser("finalize", help="freeze the invoices of a period")
    finalize.add_argument("period", help="YYYY-MM")
    finalize.add_argument(
        "--force", action="store_true", help="finalize even with usage of unpriced GPU models"
    )
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return int(exc.code or 0)
    try:
        settings = BillingSettings()
    except ValidationError as exc:
        print(f"error: bad settings: {exc}", file=sys.stderr)
        return EXIT_USAGE
    handler = HANDLERS[(args.group, args.command)]
    try:
        return asyncio.run(handler(settings, args, sys.stdout))
    except (
        CommandFailed,
        catalog_files.CatalogError,
        domain.InvalidPeriod,
        service.UnpricedUsage,
        service.IncompleteHours,
        service.PeriodAlreadyFinalized,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except store.RETRYABLE_DB_ERRORS as exc:
        print(
            f"error: cannot reach the database at {settings.database_url}: {exc}", file=sys.stderr
        )
        return EXIT_FAILED
    except asyncpg.PostgresError as exc:
        print(f"error: database: {exc}", file=sys.stderr)
        return EXIT_FAILED


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def connect(settings: BillingSettings) -> asyncpg.Connection:
    progress("applying database migrations ...")
    applied = await store.migrate(settings.database_url)
    if applied:
        progress(f"  applied {', '.join(applied)}")
    return await asyncpg.connect(settings.database_url)


def cli_actor() -> str:
    """Who runs a command, for the audit trail: the operating system's user name."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no name for this uid (a container)
        return f"cli:uid-{os.getuid()}"


async def catalog_apply(settings: BillingSettings, args: argparse.Namespace, out: TextIO) -> int:
    catalog = catalog_files.load_catalog_file(args.file)
    progress(
        f"{args.file}: {len(catalog.rate_cards)} rate cards, {len(catalog.projects)} projects: valid"
    )
    if args.check:
        return EXIT_OK
    conn = await connect(settings)
    try:
        progress("applying the catalog and recomputing draft invoices ...")
        changes = await catalog_files.apply_catalog(
            conn, catalog, prune=args.prune, actor=cli_actor()
        )
    finally:
        await conn.close()
    for name in changes.added:
        print(f"added    {name}", file=out)
    for name in changes.changed:
        print(f"changed  {name}", file=out)
    for name in changes.removed:
        print(f"removed  {name}", file=out)
    print(changes.summary(), file=out)
    return EXIT_OK


async def catalog_show(settings: BillingSettings, args: argparse.Namespace, out: TextIO) -> int:
    conn = await connect(settings)
    try:
        catalog = await catalog_files.read_catalog(conn)
    finally:
        await conn.close()
    print(catalog.model_dump_json(indent=2), file=out)
    return EXIT_OK


async def load_documents(
    settings: BillingSettings, period: str, project_id: str | None
) -> list[Invoice]:
    documents, _projects, _notes = await load_documents_and_projects(settings, period, project_id)
    return documents


async def load_documents_and_projects(
    settings: BillingSettings, period: str, project_id: str | None
) -> tuple[list[Invoice], dict[str, Project], list[CreditNote]]:
    """A period's invoices, the catalog's projects, and the credit notes against the invoices."""
    period = domain.parse_period(period)
    conn = await connect(settings)
    try:
        found = await store.load_invoices(conn, period=period, project_id=project_id)
        projects = {project.id: project for project in await store.projects(conn)}
        notes = await service.credit_notes(conn, period=period, project_id=project_id)
    finally:
        await conn.close()
    return [invoice.document() for invoice in found], projects, notes


async def invoices_list(settings: BillingSettings, args: argparse.Namespace, out: TextIO) -> int:
    documents = await load_documents(settings, args.period, args.project)
    print(
        f"{'invoice_id':<40} {'status':<9} {'gross_hkd':>14} {'subsidy_hkd':>14} {'net_hkd':>14}  flags",
        file=out,
    )
    for doc in documents:
        print(
            f"{doc.invoice_id:<40} {doc.status:<9} {doc.gross_hkd:>14} {doc.subsidy_hkd:>14}"
            f" {doc.net_hkd:>14}  {','.join(doc.flags)}",
            file=out,
        )
    progress(f"{len(documents)} invoices for {args.period}")
    return EXIT_OK


async def invoices_show(settings: BillingSettings, args: argparse.Namespace, out: TextIO) -> int:
    conn = await connect(settings)
    try:
        found = await store.load_invoice(conn, args.invoice_id)
    finally:
        await conn.close()
    if found is None:
        raise CommandFailed(f"no invoice {args.invoice_id!r}")
    print(found.document().model_dump_json(indent=2), file=out)
    return EXIT_OK


async def invoices_export(settings: BillingSettings, args: argparse.Namespace, out: TextIO) -> int:
    documents, projects, notes = await load_documents_and_projects(
        settings, args.period, args.project
    )
    if args.format == "csv":
        text = invoices_csv(documents, notes)
    elif args.format == "focus":
        text = focus_csv(documents, projects, settings.provider_name, notes)
    else:
        text = json.dumps([doc.model_dump(mode="json") for doc in documents], indent=2) + "\n"
    if args.out is None:
        out.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
    progress(f"exported {len(documents)} invoices for {args.period} as {args.format}")
    return EXIT_OK


async def periods_finalize(settings: BillingSettings, args: argparse.Namespace, out: TextIO) -> int:
    period = domain.parse_period(args.period)
    conn = await connect(settings)
    try:
        progress(f"finalizing {period} (recomputing drafts first) ...")
        result = await service.finalize_period(
            conn,
            period,
            force=args.force,
            actor=cli_actor(),
            numbering=service.Numbering(
                settings.invoice_number_prefix, settings.payment_terms_days
            ),
        )
    finally:
        await conn.close()
    for invoice_id, number in zip(result.invoice_ids, result.invoice_numbers, strict=False):
        print(f"finalized {invoice_id} as {number}", file=out)
    forced = " (forced: unpriced usage left without amounts)" if result.forced else ""
    print(f"period {period}: {len(result.invoice_ids)} invoices finalized{forced}", file=out)
    progress("the billing service publishes them on the invoices topic")
    return EXIT_OK


Handler = Callable[[BillingSettings, argparse.Namespace, TextIO], Coroutine[Any, Any, int]]
HANDLERS: dict[tuple[str, str], Handler] = {
    ("catalog", "apply"): catalog_apply,
    ("catalog", "show"): catalog_show,
    ("invoices", "list"): invoices_list,
    ("invoices", "show"): invoices_show,
    ("invoices", "export"): invoices_export,
    ("periods", "finalize"): periods_finalize,
}
