"""One real node's sampling round: GPU readings + job allocation -> usage CloudEvents
(docs/contracts.md §1)."""

from __future__ import annotations

import logging
from datetime import datetime

from services.agent.allocation import (
    AllocationError,
    AllocationSource,
    Job,
    allocation_for,
)
from services.agent.readers import GpuReader
from services.agent.simulator import usage_event

log = logging.getLogger(__name__)


class NodeSampler:
    """Reads the GPUs and their jobs at `round(at)`. If the allocation source fails, the last
    answer it gave is used (a job's GPUs rarely change within an interval; null would bill nobody)."""

    def __init__(
        self,
        node: str | None,
        reader: GpuReader,
        allocation: AllocationSource,
        interval_s: float,
        fallback_node: str = "unknown",
    ) -> None:
        self.node = node
        self.fallback_node = fallback_node
        self.reader = reader
        self.allocation = allocation
        self.interval_s = interval_s
        self.allocation_errors = 0
        self._last_jobs: dict[str, list[Job]] = {}

    def round(self, at: datetime) -> dict[str, list[dict]]:
        readings = self.reader.read()  # ReaderError propagates: the round is skipped
        try:
            self._last_jobs = self.allocation.jobs_by_device()
        except AllocationError as exc:
            self.allocation_errors += 1
            log.warning("allocation source failed (%s); using the last known allocation", exc)
        events = []
        # No AGENT_NODE: the exporter's hostname label, else this machine's name.
        node = (
            self.node
            or next((r.hostname for r in readings if r.hostname), None)
            or self.fallback_node
        )
        for reading in readings:
            allocation = allocation_for(self._last_jobs, reading.device_key, reading.uuid)
            events.append(
                usage_event(
                    node=node,
                    gpu_uuid=reading.uuid,
                    gpu_index=reading.index,
                    gpu_model=reading.model,
                    at=at,
                    interval_s=self.interval_s,
                    project_id=allocation.project_id,
                    job_id=allocation.job_id,
                    util_pct=reading.util_pct,
                    mem_used_mib=reading.mem_used_mib,
                    mem_total_mib=reading.mem_total_mib,
                    power_w=reading.power_w,
                    temp_c=reading.temp_c,
                    xid_errors=reading.xid_errors,
                )
            )
        return {node: events} if events else {}

    def close(self) -> None:
        self.reader.close()
