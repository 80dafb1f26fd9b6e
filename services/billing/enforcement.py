"""Enforcement of used-up subsidies and budgets on Slurm, opt-in per project.

A project whose catalog entry says `on_cap_exhausted: hold` has its Slurm account (the account is
the project id, as the agent maps jobs) held once its subsidy cap is used up or its `budget_hkd`
reached: `sacctmgr modify account <project> set GrpTRESMins=gres/gpu=0`, so new GPU jobs pend with
reason `AssocGrpGRESMinutes` (running jobs go on). The hold is lifted (`GrpTRESMins=gres/gpu=-1`)
when a new approval or budget makes room. `ENFORCEMENT_MODE=dry-run` (the default) decides and
records the same, without calling sacctmgr. Every hold and release goes to the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from decimal import Decimal

import asyncpg

from schemas.catalog import Project
from services.billing import service, store
from services.billing.background import BackgroundLoop
from services.billing.settings import BillingSettings
from services.billing.store import Connection

log = logging.getLogger(__name__)

HOLD_TRES = "gres/gpu=0"
RELEASE_TRES = "gres/gpu=-1"


class SacctmgrError(RuntimeError):
    """sacctmgr could not set the limit (the reason says why)."""


@dataclass(frozen=True)
class Decision:
    project_id: str
    hold: bool
    reason: str


def decide(project: Project, subsidy_used: Decimal, net_charged: Decimal) -> Decision | None:
    """Whether a project with a `hold` policy must be held now (pure); None without one."""
    if project.on_cap_exhausted != "hold":
        return None
    reasons = []
    subsidy = project.subsidy
    if subsidy is not None and subsidy_used >= subsidy.cap_hkd:
        reasons.append(
            f"{subsidy.scheme} subsidy cap {subsidy.cap_hkd} HKD used up ({subsidy_used} HKD)"
        )
    if project.budget_hkd is not None and net_charged >= project.budget_hkd:
        reasons.append(f"budget {project.budget_hkd} HKD reached ({net_charged} HKD charged)")
    if reasons:
        return Decision(project.id, True, "; ".join(reasons))
    return Decision(project.id, False, "within its subsidy cap and budget")


class Sacctmgr:
    """Sets a Slurm account's GPU-minutes limit with `sacctmgr` (SLURM_CONF in the environment
    names the cluster)."""

    def __init__(self, path: str, timeout_s: float = 30.0) -> None:
        self.path = path
        self.timeout_s = timeout_s

    async def set_gpu_minutes(self, account: str, tres: str) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                self.path,
                "-i",
                "modify",
                "account",
                account,
                "set",
                f"GrpTRESMins={tres}",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), self.timeout_s)
        except (OSError, TimeoutError) as exc:
            raise SacctmgrError(f"{self.path}: {exc!r}") from None
        if process.returncode != 0:
            raise SacctmgrError(
                f"sacctmgr exited {process.returncode}: {err.decode(errors='replace')[:500]}"
            )
        log.info("sacctmgr: account %s GrpTRESMins=%s: %s", account, tres, out.decode().strip())


@dataclass(frozen=True)
class Action:
    project_id: str
    held: bool
    reason: str
    dry_run: bool


async def enforce(
    conn: Connection, sacctmgr: Sacctmgr | None, actor: str = "system"
) -> list[Action]:
    """Hold or release the Slurm accounts whose state must change; `sacctmgr` None: dry run.
    Each change is recorded (enforcement_state) and audited in one transaction after the
    sacctmgr call succeeded, so a failed call is tried again on the next run."""
    dry_run = sacctmgr is None
    projects = await store.projects(conn)
    spend = await store.project_spend(conn)
    states = await store.enforcement_states(conn)
    actions = []
    for project in projects:
        used, net = spend.get(project.id, (Decimal(0), Decimal(0)))
        decision = decide(project, used, net)
        state = states.get(project.id)
        if decision is None:
            if state is None or not state["held"]:
                continue  # never held: nothing to lift
            decision = Decision(project.id, False, "the project's policy is no longer hold")
        if state is not None and state["held"] == decision.hold and state["dry_run"] == dry_run:
            continue
        if state is None and not decision.hold:
            continue  # never held and need not be
        if sacctmgr is not None:
            await sacctmgr.set_gpu_minutes(project.id, HOLD_TRES if decision.hold else RELEASE_TRES)
        async with conn.transaction():
            await store.set_enforcement_state(
                conn, project.id, decision.hold, decision.reason, dry_run
            )
            await store.record_audit(
                conn,
                actor,
                "slurm.hold" if decision.hold else "slurm.release",
                project.id,
                {"reason": decision.reason, "dry_run": dry_run, "account": project.id},
            )
            await service.refresh_signals(conn)  # on-call hears of it (SlurmAccountHeld)
        log.warning(
            "%s Slurm account %s: %s%s",
            "held" if decision.hold else "released",
            project.id,
            decision.reason,
            " (dry run: sacctmgr not called)" if dry_run else "",
        )
        actions.append(Action(project.id, decision.hold, decision.reason, dry_run))
    return actions


class Enforcer(BackgroundLoop):
    """Runs `enforce` every ENFORCEMENT_INTERVAL_S (and when woken), unless ENFORCEMENT_MODE is
    off; `apply` calls sacctmgr, `dry-run` only decides and records."""

    task_name = "billing-enforcer"

    def __init__(self, settings: BillingSettings, store_: store.Store) -> None:
        super().__init__()
        self.settings = settings
        self.store = store_
        self.sacctmgr = (
            Sacctmgr(settings.slurm_sacctmgr) if settings.enforcement_mode == "apply" else None
        )

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                async with self.store.acquire() as conn:
                    await enforce(conn, self.sacctmgr)
            except (SacctmgrError, asyncpg.PostgresError, OSError) as exc:
                log.error(
                    "enforcement not done (tried again in %.0f s): %s",
                    self.settings.enforcement_interval_s,
                    exc,
                )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.enforcement_interval_s)
