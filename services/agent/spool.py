"""A bounded on-disk spool: the agent's write-ahead log between sampling and the broker.

Every round is written here first and removed only after the broker acknowledged it, so neither a
broker outage nor a crash of the agent (SIGKILL included) loses a sample that was spooled; the worst
case is a re-delivery, which consumers drop by the CloudEvents identity (source + id).

- One file per record (one round: a batch per node), named by a sequence number, written to a
  temporary name and renamed into place: a crash leaves either the whole record or none of it.
- Records are read back in sequence order, so a replay keeps each GPU's samples in time order and
  always goes out before anything sampled later.
- Bounded by bytes. When full the spool keeps the oldest data and refuses the newest: the gap is at
  the end of an outage, where an operator sees it live, rather than silently eating history that
  was already waiting. Refusals are counted by the caller with a reason; warnings are logged as the
  spool crosses 50 %, 80 % and 95 % of its bound.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RECORD_NAME = re.compile(r"^(\d{16})-(\d+)\.json$")
FILL_WARNINGS = (0.5, 0.8, 0.95)


@dataclass(frozen=True)
class SpoolEntry:
    seq: int
    path: Path
    size: int
    samples: int


@dataclass(frozen=True)
class SpoolRecord:
    """One round: one Kafka message per node, (key, value) with value a CloudEvents JSON batch."""

    seq: int
    messages: list[tuple[str, bytes]]
    samples: int


class SpoolCorrupt(Exception):
    """A spool file that cannot be read back; it is removed and its samples counted as dropped."""

    def __init__(self, entry: SpoolEntry, detail: str) -> None:
        super().__init__(f"{entry.path}: {detail}")
        self.entry = entry


class Spool:
    def __init__(self, directory: Path, max_bytes: int, fsync: bool = True) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.directory = directory
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._entries: deque[SpoolEntry] = deque()
        self._bytes = 0
        self._samples = 0
        self._warned_level = 0.0
        directory.mkdir(parents=True, exist_ok=True)
        self._load()
        self._next_seq = self._entries[-1].seq + 1 if self._entries else 1

    def _load(self) -> None:
        found = []
        for path in self.directory.iterdir():
            if path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)  # a write the agent did not finish: never acknowledged
                continue
            match = RECORD_NAME.match(path.name)
            if match:
                found.append(
                    SpoolEntry(int(match.group(1)), path, path.stat().st_size, int(match.group(2)))
                )
        for entry in sorted(found, key=lambda e: e.seq):
            self._entries.append(entry)
            self._bytes += entry.size
            self._samples += entry.samples
        if found:
            log.info(
                "spool %s holds %d samples (%d bytes) from an earlier run; replaying them first",
                self.directory,
                self._samples,
                self._bytes,
            )

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def samples(self) -> int:
        return self._samples

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, messages: list[tuple[str, list[dict[str, Any]]]]) -> bool:
        """Write one record, (node, events) per node, durably. False, and nothing written, when
        it would pass the bound."""
        body = json.dumps(
            [{"key": key, "events": events} for key, events in messages],
            separators=(",", ":"),
            allow_nan=False,
        ).encode()
        samples = sum(len(events) for _, events in messages)
        with self._lock:
            if self._bytes + len(body) > self.max_bytes:
                return False
            seq = self._next_seq
            self._next_seq += 1
            path = self.directory / f"{seq:016d}-{samples}.json"
            temporary = self.directory / f".tmp-{path.name}"
            with open(temporary, "wb") as handle:
                handle.write(body)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(temporary, path)
            if self.fsync:
                self._fsync_directory()
            self._entries.append(SpoolEntry(seq, path, len(body), samples))
            self._bytes += len(body)
            self._samples += samples
            self._warn_if_filling()
        return True

    def peek(self, max_records: int) -> list[SpoolRecord]:
        """The oldest records, in order; raises SpoolCorrupt for an unreadable one (drop() it)."""
        with self._lock:
            entries = list(self._entries)[:max_records]
        records: list[SpoolRecord] = []
        for entry in entries:
            try:
                messages: list[tuple[str, bytes]] = []
                for message in json.loads(entry.path.read_bytes()):
                    key, events = message["key"], message["events"]
                    if not isinstance(key, str) or not isinstance(events, list):
                        raise ValueError("wrong shape")
                    messages.append((key, json.dumps(events, separators=(",", ":")).encode()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                if records:
                    break  # hand out the good ones first; the bad one comes up next time
                raise SpoolCorrupt(entry, str(exc)) from None
            records.append(SpoolRecord(entry.seq, messages, entry.samples))
        return records

    def remove_through(self, seq: int) -> int:
        """Forget every record up to and including `seq` (acknowledged). Returns samples removed."""
        removed = 0
        with self._lock:
            while self._entries and self._entries[0].seq <= seq:
                entry = self._entries.popleft()
                entry.path.unlink(missing_ok=True)
                self._bytes -= entry.size
                self._samples -= entry.samples
                removed += entry.samples
            if self._bytes < self.max_bytes * FILL_WARNINGS[0] / 2:
                self._warned_level = 0.0
        return removed

    def _warn_if_filling(self) -> None:
        fill = self._bytes / self.max_bytes
        crossed = [level for level in FILL_WARNINGS if fill >= level > self._warned_level]
        if crossed:
            self._warned_level = crossed[-1]
            log.warning(
                "spool %s is %.0f%% full (%d of %d bytes, %d samples waiting for the broker)",
                self.directory,
                fill * 100,
                self._bytes,
                self.max_bytes,
                self._samples,
            )

    def _fsync_directory(self) -> None:
        descriptor = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
