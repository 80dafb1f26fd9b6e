"""A bounded on-disk spool: the agent's write-ahead log between sampling and the broker.

Every round is written here first and removed only after the broker acknowledged it, so neither a
broker outage nor a crash of the agent (SIGKILL included) loses a sample that was spooled; the worst
case is a re-delivery, which consumers drop by the CloudEvents identity (source + id).

- One file per record (one round: a batch per node), named by a sequence number, written to a
  temporary name and renamed into place: a crash leaves either the whole record or none of it.
- A record file is a one-line JSON header (each node's key and the length of its CloudEvents batch,
  and a CRC-32 of the rest) followed by the batches themselves, as the bytes that go to Kafka: the
  sender hands them on, or joins several rounds of a node into one batch, without parsing any JSON.
  Files of the earlier format (`.json`, one JSON document) are still read.
- The directory is locked (flock) while a spool is open: two agents on one spool would send and
  remove each other's records.
- Records are read back in sequence order, so a replay keeps each GPU's samples in time order and
  always goes out before anything sampled later.
- Bounded by bytes. When full the spool keeps the oldest data and refuses the newest: the gap is at
  the end of an outage, where an operator sees it live, rather than silently eating history that
  was already waiting. Refusals are counted by the caller with a reason; warnings are logged as the
  spool crosses 50 %, 80 % and 95 % of its bound.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

RECORD_NAME = re.compile(r"^(\d{16})-(\d+)\.(rec|json)$")
RECORD_SUFFIX = "rec"  # the header-and-batches format; "json" is the earlier one, still read
LOCK_NAME = ".lock"
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

    @property
    def size(self) -> int:
        return sum(len(value) for _, value in self.messages)


class SpoolCorrupt(Exception):
    """A spool file that cannot be read back; it is removed and its samples counted as dropped."""

    def __init__(self, entry: SpoolEntry, detail: str) -> None:
        super().__init__(f"{entry.path}: {detail}")
        self.entry = entry


class SpoolLocked(Exception):
    """Another process has this spool directory open."""


def encode_record(messages: list[tuple[str, list[dict[str, Any]]]]) -> bytes:
    """A record file's bytes: the header line, then each node's batch as compact JSON."""
    values = [
        json.dumps(events, separators=(",", ":"), allow_nan=False).encode()
        for _, events in messages
    ]
    body = b"".join(values)
    header = {
        "crc32": f"{zlib.crc32(body):08x}",  # fixed width: like records have like sizes
        "messages": [[key, len(value)] for (key, _), value in zip(messages, values, strict=True)],
    }
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + body


def decode_record(data: bytes) -> list[tuple[str, bytes]]:
    """(key, value) per node from a record file of either format; ValueError if it is damaged."""
    if data[:1] == b"[":  # the earlier format: one JSON document, re-encoded per node
        messages = []
        for message in json.loads(data):
            key, events = message["key"], message["events"]
            if not isinstance(key, str) or not isinstance(events, list):
                raise ValueError("wrong shape")
            messages.append((key, json.dumps(events, separators=(",", ":")).encode()))
        return messages
    newline = data.find(b"\n")
    if newline < 0:
        raise ValueError("no header line")
    header = json.loads(data[:newline])
    body = data[newline + 1 :]
    if not isinstance(header, dict) or header.get("crc32") != f"{zlib.crc32(body):08x}":
        raise ValueError("checksum mismatch")
    messages, offset = [], 0
    for key, length in header["messages"]:
        value = body[offset : offset + length]
        if not isinstance(key, str) or len(value) != length or value[:1] + value[-1:] != b"[]":
            raise ValueError("wrong shape")
        messages.append((key, value))
        offset += length
    if offset != len(body):
        raise ValueError("trailing bytes")
    return messages


def spooled_files(directory: Path) -> Iterator[tuple[Path, int]]:
    """(path, samples) of every record in a spool directory, from the names alone: for reports."""
    for path in sorted(directory.iterdir()) if directory.is_dir() else ():
        match = RECORD_NAME.match(path.name)
        if match:
            yield path, int(match.group(2))


def spooled_events(directory: Path) -> list[dict[str, Any]]:
    """Every event a spool directory holds, oldest record first: for checks and tests."""
    events: list[dict[str, Any]] = []
    for path, _ in spooled_files(directory):
        for _key, value in decode_record(path.read_bytes()):
            events.extend(json.loads(value))
    return events


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
        self._lock_file: IO[bytes] | None = self._lock_directory()
        self._load()
        self._next_seq = self._entries[-1].seq + 1 if self._entries else 1

    def _lock_directory(self) -> IO[bytes]:
        handle = open(self.directory / LOCK_NAME, "ab")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SpoolLocked(f"{self.directory} is in use by another agent") from None
        return handle

    def close(self) -> None:
        """Release the directory; the records stay for the next start."""
        handle, self._lock_file = self._lock_file, None
        if handle is not None:
            handle.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        data = encode_record(messages)
        samples = sum(len(events) for _, events in messages)
        with self._lock:
            if self._bytes + len(data) > self.max_bytes:
                return False
            seq = self._next_seq
            self._next_seq += 1
            path = self.directory / f"{seq:016d}-{samples}.{RECORD_SUFFIX}"
            temporary = self.directory / f".tmp-{path.name}"
            with open(temporary, "wb") as handle:
                handle.write(data)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(temporary, path)
            if self.fsync:
                self._fsync_directory()
            self._entries.append(SpoolEntry(seq, path, len(data), samples))
            self._bytes += len(data)
            self._samples += samples
            self._warn_if_filling()
        return True

    def peek(self, max_records: int, max_bytes: int | None = None) -> list[SpoolRecord]:
        """The oldest records, in order, at most `max_records` and, past the first, `max_bytes`
        of files; raises SpoolCorrupt for an unreadable one (remove it)."""
        with self._lock:
            entries = list(self._entries)[:max_records]
        records: list[SpoolRecord] = []
        total = 0
        for entry in entries:
            total += entry.size
            if records and max_bytes is not None and total > max_bytes:
                break
            try:
                messages = decode_record(entry.path.read_bytes())
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
