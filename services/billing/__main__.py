"""`python -m services.billing` runs the service; with a subcommand it runs the CLI."""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic import ValidationError

from services.billing import cli


def main(argv: list[str]) -> int:
    if argv:
        return cli.main(argv)
    from services.billing.app import run
    from services.billing.settings import BillingSettings

    try:
        settings = BillingSettings()
    except ValidationError as exc:
        print(f"billing: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings.warn_if_insecure(logging.getLogger("services.billing"))
    asyncio.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
