"""A Kafka node count or isolation time nobody would mean is refused by the command line, before
anything starts (before, 0 nodes failed deep in a service's settings, -1 ran a whole drill)."""

from __future__ import annotations

import pytest

from gpumeter import cli, drill


@pytest.mark.parametrize("count", ["0", "-1", "10", "three", "1.5", ""])
def test_gpumeter_up_refuses_a_kafka_node_count_out_of_1_to_9(
    count: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["up", "--broker", "kafka", "--kafka-nodes", count])
    assert stopped.value.code == 2
    assert "--kafka-nodes" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [["--kafka-nodes", "0"], ["--kafka-nodes", "x"], ["--isolate-s", "0"], ["--isolate-s", "-5"]],
)
def test_the_drill_refuses_nonsense_before_it_starts(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        drill.parse_args(["--broker", "kafka", *args])
    assert stopped.value.code == 2
    assert args[0] in capsys.readouterr().err


def test_sensible_counts_pass() -> None:
    assert cli.kafka_node_count("3") == 3
    assert (
        drill.parse_args(
            ["--broker", "kafka", "--kafka-nodes", "3", "--isolate-s", "20"]
        ).kafka_nodes
        == 3
    )
