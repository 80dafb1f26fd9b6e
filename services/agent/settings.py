"""Node agent settings, read once from the environment (AGENT_* for agent-specific ones)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import CommonSettings


class AgentSettings(CommonSettings):
    agent_http_port: int = Field(9400)
    agent_sim_nodes: int = Field(8)
    agent_sim_seed: int = Field(7)
    agent_interval_s: float = Field(10.0)
    agent_sim_speed: float = Field(1.0, description="simulated seconds per real second; 0 = flat out")
    agent_sim_start: str = Field("", description="ISO time or '-6h'/'-30d' from now; empty = now")
    agent_sim_target_allocation: float = Field(0.92)
    agent_sim_silence_per_node_day: float = Field(0.0)
    agent_sim_until: str = Field("", description="stop after this simulated time (ISO or offset)")
