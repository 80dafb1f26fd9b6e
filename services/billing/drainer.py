"""Background loop that brings draft invoices up to date with the ledger.

The consumer only upserts the ledger and marks the touched projects dirty (durably, in the same
transaction); this loop rebuilds the dirty projects' drafts in bulk, in its own transaction under
the billing write lock, then wakes the publisher for the billing signals. It runs as soon as it is
woken, at most every `min_interval_s`, and also polls, so marks left by a crash or another process
are picked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import asyncpg

from services.billing import metrics, service, store
from services.billing.background import BackgroundLoop
from services.billing.settings import BillingSettings

log = logging.getLogger(__name__)


class DraftDrainer(BackgroundLoop):
    task_name = "billing-draft-drainer"

    def __init__(
        self,
        settings: BillingSettings,
        store_: store.Store,
        on_invoices_changed: Callable[[], None] | None = None,
        min_interval_s: float = 0.2,
        poll_interval_s: float = 1.0,
        max_projects: int = 5000,
    ) -> None:
        self.settings = settings
        self.store = store_
        self.on_invoices_changed = on_invoices_changed
        self.min_interval_s = min_interval_s
        self.poll_interval_s = poll_interval_s
        self.max_projects = max_projects
        super().__init__()

    async def _pending(self) -> bool:
        pending: bool = await service.with_db_retry(
            self.store,
            store.has_dirty_projects,
            "has_dirty_projects",
            self.settings.db_retry_max_backoff_s,
        )
        return pending

    async def drain_once(self) -> list[str]:
        """One pass over (up to max_projects of) the dirty projects; returns the invoices that
        changed."""
        if not await self._pending():
            return []
        return await service.with_db_retry(
            self.store,
            lambda conn: service.drain_dirty_projects(conn, self.max_projects),
            "drain_dirty_projects",
            self.settings.db_retry_max_backoff_s,
        )

    async def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            started = time.monotonic()
            more = False
            try:
                changed = await self.drain_once()
                more = await self._pending()  # marked meanwhile, or beyond max_projects
            except asyncpg.PostgresError as exc:
                log.warning("draining dirty projects failed (%r); retrying", exc)
                changed = []
            if changed:
                metrics.INVOICES_RECOMPUTED.inc(len(changed))
                if self.on_invoices_changed is not None:
                    self.on_invoices_changed()
            if not more:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            # at most one pass every min_interval_s: batches arriving meanwhile are drained together
            rest = self.min_interval_s - (time.monotonic() - started)
            if rest > 0 and not self._stopping.is_set():
                await asyncio.sleep(rest)
