"""Create topics up front, so consumers never join a group while topics are still appearing."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

log = logging.getLogger(__name__)


async def ensure_topics(
    bootstrap_servers: str,
    topics: dict[str, int],
    compacted: set[str] | frozenset[str] = frozenset(),
    attempts: int = 30,
    configs: dict[str, dict[str, str]] | None = None,
) -> None:
    """Create each missing topic with its partition count. Existing topics are left as they are."""
    for attempt in range(attempts):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [
                NewTopic(
                    name,
                    partitions,
                    1,
                    topic_configs={
                        **({"cleanup.policy": "compact"} if name in compacted else {}),
                        **(configs or {}).get(name, {}),
                    },
                )
                for name, partitions in topics.items()
                if name not in existing
            ]
            if missing:
                with contextlib.suppress(TopicAlreadyExistsError):  # another service was first
                    await admin.create_topics(missing)
                log.info("created topics %s", ", ".join(t.name for t in missing))
            return
        except (KafkaConnectionError, OSError) as exc:
            if attempt == attempts - 1:
                raise
            log.warning("broker %s not reachable yet (%s); retrying", bootstrap_servers, exc)
            await asyncio.sleep(1.0)
        finally:
            await admin.close()
