"""`python -m services.alerts` runs the alerts service until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from pydantic import ValidationError

from services.alerts import config
from services.alerts.app import AlertsService
from services.alerts.settings import AlertsSettings


async def main() -> None:
    settings = AlertsSettings()  # type: ignore[call-arg]
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings.warn_if_insecure(logging.getLogger("services.alerts"))
    service = AlertsService(settings, config.load(settings.rules_path, settings.receiver_env))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    await service.run()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except (config.ConfigError, ValidationError) as exc:
        print(f"alerts: {exc}", file=sys.stderr)
        sys.exit(2)
