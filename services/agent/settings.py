"""Node agent settings, read once from the environment (AGENT_* for agent-specific ones)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.common.settings import CommonSettings


class AgentSettings(CommonSettings):
    agent_http_port: int = Field(9400)
    agent_interval_s: float = Field(10.0, gt=0, le=3600, description="sampling interval")
    agent_node: str = Field("", description="node id (Kafka key, event source); empty = hostname")

    # Real readers (without --simulate)
    agent_reader: Literal["nvml", "dcgm"] = Field("nvml")
    agent_dcgm_url: str = Field("http://127.0.0.1:9400/metrics")
    agent_allocation: Literal["none", "slurm", "jobmap"] = Field("none")
    agent_job_map_dir: str = Field(
        "/run/dcgm-job-map", description="prolog/epilog job mapping (AGENT_ALLOCATION=jobmap)"
    )
    agent_job_projects_file: str = Field(
        "", description="'job_id project_id' lines for jobmap; empty = ask scontrol"
    )
    agent_scontrol: str = Field("scontrol")

    # Delivery
    agent_spool_dir: str = Field(
        "",
        description="write-ahead spool; empty = /var/spool/gpumeter-agent, or with --simulate "
        "a directory under the system temp dir named after the fleet, replayed when the same "
        "fleet starts again and removed once it exits drained",
    )
    agent_spool_max_bytes: int = Field(256 * 1024 * 1024, gt=0)
    agent_spool_fsync: bool = Field(True)
    agent_kafka_timeout_ms: int = Field(
        10000, ge=1000, description="bounds connect, metadata and acknowledgement waits"
    )
    agent_shutdown_flush_s: float = Field(10.0, ge=0)

    # Simulator (--simulate)
    agent_sim_nodes: int = Field(8)
    agent_sim_gpus_per_node: int = Field(8, ge=1)
    agent_sim_seed: int = Field(7)
    agent_sim_speed: float = Field(
        1.0, description="simulated seconds per real second; 0 = flat out"
    )
    agent_sim_start: str = Field("", description="ISO time or '-6h'/'-30d' from now; empty = now")
    agent_sim_target_allocation: float = Field(0.92)
    agent_sim_silence_per_node_day: float = Field(0.0)
    agent_sim_until: str = Field("", description="stop after this simulated time (ISO or offset)")

    @model_validator(mode="after")
    def _jobmap_needs_a_directory(self) -> AgentSettings:
        if self.agent_allocation == "jobmap" and not self.agent_job_map_dir:
            raise ValueError("AGENT_ALLOCATION=jobmap needs AGENT_JOB_MAP_DIR")
        return self
