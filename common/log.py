"""The ``sepals`` logger.

Library code logs through :func:`log` and never configures handlers; front ends (the
CLIs) do. Messages never carry secrets or plaintext statistics of model updates.
"""

from __future__ import annotations

import logging

LOGGER = logging.getLogger("sepals")


def log(level: int, msg: str, *args: object) -> None:
    """Log ``msg % args`` at ``level`` on the ``sepals`` logger."""
    LOGGER.log(level, msg, *args)


def configure_cli_logging(verbose: bool) -> None:
    """Logging for the deployment front ends: timestamps on stderr, HTTP chatter muted."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)
