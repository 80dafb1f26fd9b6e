"""Where the agent spools: a simulated fleet without AGENT_SPOOL_DIR finds what an earlier run of
the same fleet left behind (a SIGKILL skips the clean-up), and two runs never share one spool."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from services.agent.__main__ import open_spool, simulation_spool_dir
from services.agent.settings import AgentSettings


@pytest.fixture(autouse=True)
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def settings(**values: object) -> AgentSettings:
    return AgentSettings(agent_spool_fsync=False, **values)  # type: ignore[arg-type]


def test_the_same_simulated_fleet_always_spools_to_the_same_directory(temp_dir: Path) -> None:
    fleet = settings(agent_sim_nodes=165, topic_prefix="a.")

    assert simulation_spool_dir(fleet) == simulation_spool_dir(
        settings(agent_sim_nodes=165, topic_prefix="a.")
    )
    assert simulation_spool_dir(fleet).parent == temp_dir
    assert simulation_spool_dir(fleet) != simulation_spool_dir(
        settings(agent_sim_nodes=8, topic_prefix="a.")
    )
    assert simulation_spool_dir(fleet) != simulation_spool_dir(
        settings(agent_sim_nodes=165, topic_prefix="b.")
    )


def test_a_simulation_started_again_finds_the_rounds_a_killed_run_left_in_its_spool() -> None:
    fleet = settings(agent_sim_nodes=2)
    first = open_spool(fleet, simulation=True)
    first.append([("node-001", [{"id": "node-001/gpu/60", "time": 60}])])
    first.close()  # as a SIGKILL would: the lock goes with the process, the records stay

    again = open_spool(fleet, simulation=True)

    assert again.directory == first.directory
    assert again.samples == 1


def test_a_second_run_of_the_same_simulation_spools_apart_while_the_first_runs() -> None:
    fleet = settings(agent_sim_nodes=2)
    running = open_spool(fleet, simulation=True)
    running.append([("node-001", [{"id": "node-001/gpu/60", "time": 60}])])

    second = open_spool(fleet, simulation=True)

    assert second.directory != running.directory
    assert len(second) == 0 and running.samples == 1


def test_a_real_agent_uses_its_configured_spool(tmp_path: Path) -> None:
    spool = open_spool(settings(agent_spool_dir=str(tmp_path / "node-spool")), simulation=False)

    assert spool.directory == tmp_path / "node-spool"
