"""Dead letters on gpu.usage.dlq.v1 (docs/contracts.md §1)."""

from __future__ import annotations

from pydantic import BaseModel


class DeadLetter(BaseModel):
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    raw: str  # the original message bytes, base64
