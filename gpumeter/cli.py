"""`gpumeter`: one command for the local stack and the billing team's tasks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BILLING_COMMANDS = {"catalog", "invoices", "periods"}


def kafka_node_count(text: str) -> int:
    """--kafka-nodes: 1 to 9 (a KRaft quorum on one machine), refused here rather than deep in
    the broker's or a service's start-up."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= count <= 9:
        raise argparse.ArgumentTypeError(f"{count} nodes: give 1 to 9")
    return count


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in BILLING_COMMANDS:
        from services.billing.cli import main as billing_main

        return billing_main(argv)
    if argv and argv[0] == "drill":
        from gpumeter.drill import main as drill_main

        return drill_main(argv[1:])

    parser = argparse.ArgumentParser(prog="gpumeter", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser(
        "up", help="run broker, database, services and a simulated fleet locally"
    )
    up.add_argument("--no-fleet", action="store_true", help="leave the simulated fleet out")
    up.add_argument("--nodes", type=int, default=165, help="simulated nodes (8 H800 each)")
    up.add_argument(
        "--speed", type=float, default=120.0, help="simulated seconds per real second (to now)"
    )
    up.add_argument("--start", default="-1d", help="simulated start: ISO time or offset like -2d")
    up.add_argument(
        "--interval", type=float, default=60.0, help="sampling interval of the simulated agents (s)"
    )
    up.add_argument("--partitions", type=int, default=8, help="partitions of gpu.usage.v1")
    up.add_argument("--data-dir", type=Path, default=Path("var"))
    up.add_argument(
        "--broker",
        choices=("tansu", "kafka"),
        default="tansu",
        help="the local broker when KAFKA_BOOTSTRAP_SERVERS names none: Tansu (in memory, starts "
        "in under a second, the default) or Apache Kafka (KRaft, the production broker; its jars "
        "are fetched from Maven Central once)",
    )
    up.add_argument(
        "--kafka-nodes",
        type=kafka_node_count,
        default=1,
        help="Apache Kafka nodes (3: replication factor 3)",
    )
    up.add_argument(
        "--duration", type=float, default=None, help="stop by itself after this many seconds"
    )
    commands.add_parser(
        "drill", help="the fault drill: kill, cut and restart, then check the money"
    )
    commands.add_parser("catalog", help="catalog apply FILE (billing)")
    commands.add_parser("invoices", help="list, show, export invoices (billing)")
    commands.add_parser("periods", help="finalize a period (billing)")
    args = parser.parse_args(argv)

    if args.command == "up":
        from gpumeter.stack import StackOptions, run

        return run(
            StackOptions(
                data_dir=args.data_dir,
                fleet=not args.no_fleet,
                nodes=args.nodes,
                speed=args.speed,
                start=args.start,
                interval_s=args.interval,
                partitions=args.partitions,
                duration_s=args.duration,
                broker=args.broker,
                kafka_nodes=args.kafka_nodes,
            )
        )
    parser.error(f"unknown command {args.command}")
    return 2
