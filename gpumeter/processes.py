"""Finding and stopping the local stack's processes by a marker in their environment.

Every process the local stack starts (broker, PostgreSQL and its backends, services, their
workers, the simulated fleet) inherits `GPUMETER_STACK=<data directory>` from the stack process.
That marker, unlike a pid or a process group, survives re-parenting and cannot be reused by an
unrelated process, so it is how the guardian (gpumeter.guardian) cleans up after a stack that
died, how a new `gpumeter up` stops what an earlier one on the same data directory left behind,
and how the tests check that nothing stayed behind.

Linux only (/proc); stdlib only, so the guardian starts fast and depends on nothing that can break.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass

STACK_ENV = "GPUMETER_STACK"


@dataclass(frozen=True)
class Proc:
    pid: int
    pgid: int
    name: str


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(name, state, pgid) of a live process; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode(errors="replace")
    except OSError:
        return None
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return name, fields[0], int(fields[2])


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie holds nothing but its pid)."""
    found = _stat(pid)
    return found is not None and found[1] not in ("Z", "X")


def marked(value: str, exclude: Iterable[int] = ()) -> list[Proc]:
    """Live processes whose environment holds GPUMETER_STACK=`value` (this process excluded)."""
    needle = f"{STACK_ENV}={value}".encode()
    skip = {os.getpid(), *exclude}
    found: list[Proc] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        if needle in environ:
            stat = _stat(pid)
            if stat is not None and stat[1] not in ("Z", "X"):
                found.append(Proc(pid, stat[2], stat[0]))
    return found


def signal_all(procs: Iterable[Proc], sig: int) -> None:
    for proc in procs:
        try:
            os.kill(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            continue


def wait_gone(pids: Iterable[int], timeout_s: float) -> list[int]:
    """Wait until none of `pids` is alive; returns those still alive at the deadline."""
    waiting = set(pids)
    deadline = time.monotonic() + timeout_s
    while waiting:
        waiting = {pid for pid in waiting if alive(pid)}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return sorted(waiting)


def stop_marked(
    value: str,
    grace_s: float = 10.0,
    exclude: Iterable[int] = (),
    first: Iterable[int] = (),
    signals: dict[int, int] | None = None,
) -> list[Proc]:
    """Stop every process marked with `value`: the process groups in `first` (the services, which
    still need the broker and the database to flush) before the rest; each with its signal from
    `signals` (pgid -> signal; SIGTERM otherwise), SIGKILL after `grace_s`. Returns what it found."""
    signals = signals or {}
    found = marked(value, exclude)
    early = set(first)
    for tier in ([p for p in found if p.pgid in early], [p for p in found if p.pgid not in early]):
        for proc in tier:
            # A group's leader gets the group's signal; its members follow their leader (a
            # PostgreSQL backend must not be told to die before the postmaster is).
            if proc.pid == proc.pgid or proc.pgid not in signals:
                signal_all([proc], signals.get(proc.pgid, signal.SIGTERM))
        left = wait_gone([p.pid for p in tier], grace_s)
        if left:
            signal_all([p for p in tier if p.pid in left], signal.SIGKILL)
            wait_gone(left, 5.0)
    # Whatever appeared meanwhile (a worker respawned during the stop) or slipped through.
    stragglers = marked(value, exclude)
    signal_all(stragglers, signal.SIGKILL)
    wait_gone([p.pid for p in stragglers], 5.0)
    return found
