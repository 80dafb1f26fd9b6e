"""`python -m services.metering` starts one metering worker, or WORKER_PROCESSES of them under a
supervisor (one per core: a worker is one Python process)."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys

from pydantic import ValidationError

from services.common.kafka_admin import ensure_topics
from services.metering.settings import (
    DEAD_LETTER_MAX_BYTES,
    USAGE_TOPIC_MAX_BYTES,
    MeteringSettings,
)

FAUST_LOG_LEVELS = {
    "CRITICAL": "crit",
    "ERROR": "error",
    "WARNING": "warn",
    "INFO": "info",
    "DEBUG": "debug",
}


def main() -> None:
    try:
        settings = MeteringSettings()
    except ValidationError as exc:
        print(f"metering: invalid settings:\n{exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s metering %(message)s"
    )
    settings.warn_if_insecure(logging.getLogger("services.metering"))
    asyncio.run(
        ensure_topics(
            settings.kafka_bootstrap_servers,
            settings.all_topics(),
            settings.compacted_topics(),
            configs={
                settings.topics.usage: {"max.message.bytes": str(USAGE_TOPIC_MAX_BYTES)},
                settings.topics.usage_dlq: {"max.message.bytes": str(DEAD_LETTER_MAX_BYTES)},
            },
            replication_factor=settings.kafka_replication_factor,
            security=settings.kafka_security.aiokafka(),
        )
    )
    if settings.worker_processes > 1:
        from services.metering.supervisor import run_supervised  # no Faust in the supervisor

        sys.exit(run_supervised(settings))
    from services.metering.app import create_app

    gc.set_threshold(settings.gc_gen0_threshold, 20, 10)
    app = create_app(settings)
    level = FAUST_LOG_LEVELS.get(settings.log_level.upper(), "info")
    sys.argv = [sys.argv[0], "worker", "--loglevel", level]
    app.main()


if __name__ == "__main__":
    main()
