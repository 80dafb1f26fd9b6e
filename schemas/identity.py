"""Usage event type and id rule, free of pydantic so the node agent stays small in memory."""

from __future__ import annotations

from datetime import datetime

USAGE_EVENT_TYPE = "io.gpumeter.gpu.usage.v1"


def usage_event_id(node: str, gpu_uuid: str, time: datetime) -> str:
    """Stable id for a sample: the same GPU and interval always get the same id (retries dedup)."""
    return f"{node}/{gpu_uuid}/{int(time.timestamp())}"
