"""The ``sepals`` logger.

Library code logs through :func:`log` and never configures handlers; front ends (the
CLIs) do. Messages never carry secrets or plaintext statistics of model updates.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

LOGGER = logging.getLogger("sepals")

# Hugging Face libraries, loaded by an app in every client of every round, keep their
# loading bars (transformers draws them while huggingface_hub's switch, read at import,
# is on) and their warnings below errors to themselves.
QUIET_LIBRARY_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def log(level: int, msg: str, *args: object) -> None:
    """Log ``msg % args`` at ``level`` on the ``sepals`` logger."""
    LOGGER.log(level, msg, *args)


def quiet_libraries() -> None:
    """Set :data:`QUIET_LIBRARY_ENV` in this process (and its children) unless already set."""
    for key, value in QUIET_LIBRARY_ENV.items():
        os.environ.setdefault(key, value)


def configure_cli_logging(verbose: bool) -> None:
    """Logging for the deployment front ends: timestamps on stderr, HTTP chatter muted."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)
    show_flower_once()


def show_flower_once(level: int | None = None) -> None:
    """Print each of Flower's log lines at most once, from ``level`` up if given.

    Flower prints its records through its own handler. A handler on the root logger
    (Opacus installs one with ``logging.basicConfig`` when it is imported) would print
    every Flower line a second time, so Flower's records stop at Flower's logger, as
    Flower itself arranges in notebooks.
    """
    flower = logging.getLogger("flwr")
    flower.propagate = False  # Flower's own import leaves this alone
    if level is not None:
        # Flower's logger module sets the logger's level when it loads: load it first.
        import flwr.common.logger  # noqa: F401

        flower.setLevel(level)


class _FlowerNotice(logging.Filter):
    """Drops Flower's deprecation notice of one feature (Flower logs it; it does not warn)."""

    def __init__(self, feature: str) -> None:
        super().__init__()
        self.feature = feature

    def filter(self, record: logging.LogRecord) -> bool:
        notice = str(record.msg).lstrip().startswith("DEPRECATED FEATURE")
        return not (notice and self.feature in str(record.args))


@contextlib.contextmanager
def without_flower_notice(feature: str) -> Iterator[None]:
    """Silence Flower's deprecation notice that names ``feature`` inside the block."""
    notice = _FlowerNotice(feature)
    flower = logging.getLogger("flwr")
    flower.addFilter(notice)
    try:
        yield
    finally:
        flower.removeFilter(notice)
