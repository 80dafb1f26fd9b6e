"""`python -m gpumeter.guardian MARKER`: stops the local stack's processes when the stack ends.

The stack starts this first, in a session of its own (so neither Ctrl-C nor a closing terminal
reaches it), and keeps the write end of its stdin. It reads lines `group PGID SIGNAL TIER` as the
stack starts process groups; when stdin ends, which happens however the stack process ends (a
clean stop, an exception, SIGKILL), it stops every process marked GPUMETER_STACK=MARKER: the tier-0
groups (services) first, then the rest (PostgreSQL with its fast-shutdown SIGINT, the broker),
SIGKILL after a grace period. A clean stop and a crash of the stack take the same path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from gpumeter.processes import stop_marked


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m gpumeter.guardian MARKER", file=sys.stderr)
        return 2
    marker = argv[0]
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    first: list[int] = []
    signals: dict[int, int] = {}
    stack_pid = os.getppid()
    for line in sys.stdin:
        parts = line.split()
        if len(parts) == 4 and parts[0] == "group":
            pgid, signum, tier = int(parts[1]), int(parts[2]), int(parts[3])
            signals[pgid] = signum
            if tier == 0:
                first.append(pgid)
    began = time.monotonic()
    found = stop_marked(marker, grace_s=15.0, exclude=[stack_pid], first=first, signals=signals)
    log(f"stack ended: stopped {len(found)} processes in {time.monotonic() - began:.1f} s")
    return 0


def log(text: str) -> None:
    with contextlib.suppress(OSError):
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} guardian: {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
