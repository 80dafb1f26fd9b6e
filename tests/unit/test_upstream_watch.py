"""The upstream code metering's fixes replace or rely on, pinned by a hash of each function's
source as installed (read from the package's file, so a fix applied in this process does not
hide a change). When a hash changes, faust-streaming, mode-streaming or aiokafka changed that
function: re-check the fix named beside it (docs/scaling.md, "Faust's fixes", and
docs/upstream/), then update the hash here.

faust-streaming is pinned exactly in pyproject.toml; this also catches a pin that was moved
without that check, and mode-streaming and aiokafka, which are pinned to a minor version."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

# Exact for faust-streaming (pinned); the minor version for the others (their hashes below catch
# a patch release that touches what we depend on).
VERSIONS = {"faust-streaming": "0.15.3", "mode-streaming": "0.7.", "aiokafka": "0.14."}

# (module, class, function) -> (sha256 prefix of its source, the gpumeter code that depends on it)
WATCHED = {
    ("faust.transport.producer", "ProducerBuffer", "_send_pending"): (
        "551d98f01c547d48",
        "transport.CompleteFlushBuffer / transport.Producer.flush",
    ),
    ("faust.transport.producer", "ProducerBuffer", "flush"): (
        "97b9a044b51134e7",
        "transport.CompleteFlushBuffer / transport.Producer.flush",
    ),
    ("faust.transport.drivers.aiokafka", "Producer", "flush"): (
        "38ff8817068ac7df",
        "transport.CompleteFlushBuffer / transport.Producer.flush",
    ),
    ("faust.transport.drivers.aiokafka", "AIOKafkaConsumerThread", "_highwaters"): (
        "d610b66ccfe6a82f",
        "transport.ConsumerThread._highwaters",
    ),
    ("faust.transport.drivers.aiokafka", "AIOKafkaConsumerThread", "_create_worker_consumer"): (
        "684c167041ff0044",
        "transport.ConsumerThread._create_worker_consumer",
    ),
    ("faust.transport.consumer", "Consumer", "__init__"): (
        "98de5b3b169c981e",
        "transport.Consumer.__init__ (_ReadOffsets replaces _read_offset) and committed_offset",
    ),
    ("faust.transport.consumer", "ThreadDelegateConsumer", "__init__"): (
        "715814ce37c57592",
        "transport.Consumer.__init__ (wraps _read_offset after it)",
    ),
    ("faust.transport.consumer", "Consumer", "_new_offset"): (
        "7524555f309a6493",
        "transport.Consumer._new_offset",
    ),
    ("faust.transport.consumer", "Consumer", "_drain_messages"): (
        "8308d11bc7a290dc",
        "transport._ReadOffsets (binds _read_offset.__getitem__) and Consumer.wait_first",
    ),
    ("faust.transport.consumer", "Consumer", "on_buffer_full"): (
        "01644b5587f109ec",
        "transport.Consumer.fetched_partitions / fetch_again (_active_partitions, _buffered_partitions)",
    ),
    ("faust.transport.consumer", "Consumer", "on_buffer_drop"): (
        "2977cdf59ecbd492",
        "transport.Consumer.fetch_again",
    ),
    ("faust.transport.consumer", "Consumer", "pause_partitions"): (
        "a51f7bdf316a0af1",
        "transport.Consumer.why_not_fetched (_paused_partitions)",
    ),
    ("faust.transport.consumer", "Consumer", "resume_partitions"): (
        "0ce68544cb09fe58",
        "transport.Consumer.fetch_again",
    ),
    ("faust.transport.consumer", "ThreadDelegateConsumer", "seek_to_committed"): (
        "7bc5dc7eb96c9b34",
        "transport.Consumer.seek_to_committed",
    ),
    ("faust.transport.consumer", "ThreadDelegateConsumer", "_seek"): (
        "1f859c70f9d809e4",
        "transport.Consumer._seek",
    ),
    ("mode.services", "Service", "wait_first"): (
        "79f98bfdf43f8ea8",
        "transport.Consumer.wait_first (wait_first_in_place falls back to it)",
    ),
    ("faust.transport.producer", "Producer", "__init__"): (
        "298a3dca46c45360",
        "transport.Producer.__init__ (replaces the ProducerBuffer made here)",
    ),
    ("faust.transport.drivers.aiokafka", "Producer", "_ensure_producer"): (
        "4444c75c31a07171",
        "transport.Producer.kafka_producer (DirectSender appends to the producer Faust flushes)",
    ),
    ("faust.transport.drivers.aiokafka", "Consumer", "_new_consumer_thread"): (
        "e3e2675bb60b2e9a",
        "transport.Consumer._new_consumer_thread (metering's ConsumerThread instead)",
    ),
    ("aiokafka.consumer.fetcher", "Fetcher", "seek_to"): (
        "14c7d60bbd891b5a",
        "transport.Consumer._seek (the race it avoids)",
    ),
    ("aiokafka.consumer.fetcher", "Fetcher", "fetched_records"): (
        "002f5b2f4ca34dee",
        "transport.Consumer._seek (the race it avoids)",
    ),
}


def source_hash(module: str, cls: str, function: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} is not installed"
    path = Path(spec.origin)
    text = path.read_text()
    tree = ast.parse(text)
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    assert found, f"{module}.{cls} is gone"
    functions = [
        n
        for n in found[0].body
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == function
    ]
    assert functions, f"{module}.{cls}.{function} is gone"
    source = ast.get_source_segment(text, functions[0])
    assert source is not None
    return hashlib.sha256(source.encode()).hexdigest()[:16]


@pytest.mark.parametrize("package", sorted(VERSIONS))
def test_the_installed_versions_are_the_ones_the_fixes_were_checked_against(package: str) -> None:
    installed = importlib.metadata.version(package)
    wanted = VERSIONS[package]
    assert installed == wanted or (wanted.endswith(".") and installed.startswith(wanted)), (
        f"{package} {importlib.metadata.version(package)} is installed; the fixes in "
        f"services/metering/transport.py were checked against {VERSIONS[package]}"
    )


@pytest.mark.parametrize(
    ("where", "expected"), sorted(WATCHED.items()), ids=[".".join(w[1:]) for w in sorted(WATCHED)]
)
def test_each_upstream_function_a_fix_depends_on_is_unchanged(
    where: tuple[str, str, str], expected: tuple[str, str]
) -> None:
    digest, fix = expected
    actual = source_hash(*where)
    assert actual == digest, (
        f"{'.'.join(where)} changed upstream (source hash {actual}, was {digest}): re-check {fix}"
    )


def upstream_overrides() -> list[tuple[str, str, str]]:
    """(module, class, method) of every upstream method a class of metering's transport
    overrides: the upstream class nearest in the method resolution order that defines it."""
    from services.metering import transport

    found = []
    for cls in (
        transport.Consumer,
        transport.ConsumerThread,
        transport.Producer,
        transport.CompleteFlushBuffer,
    ):
        for name, member in vars(cls).items():
            if not callable(member) or name in {"__init_subclass__"}:
                continue
            for base in cls.__mro__[1:]:
                if name in vars(base):
                    found.append((base.__module__, base.__qualname__, name))
                    break
    return found


def test_every_upstream_method_the_transport_overrides_is_watched() -> None:
    overrides = upstream_overrides()
    assert ("faust.transport.consumer", "Consumer", "_new_offset") in overrides  # the check works
    assert [where for where in overrides if where not in WATCHED] == []
