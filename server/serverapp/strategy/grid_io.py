"""Sending messages through Flower's ``Grid`` and collecting their replies quickly."""

from __future__ import annotations

import time
from collections.abc import Iterable
from time import sleep

from flwr.app import Message
from flwr.serverapp import Grid

# Polling of a masking stage's replies: every 10 ms at first, the interval growing by 5%
# of the time already waited, up to 0.5 s. Flower's send_and_receive polls every 0.1 s
# (simulation) or 3 s (deployment); a masking stage's replies come within tens of
# milliseconds in a simulation, so polling sooner keeps the extra exchanges cheap.
_POLL_FIRST, _POLL_GROWTH, _POLL_MOST = 0.01, 0.05, 0.5


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Send ``messages`` and collect their replies until all are in or ``timeout`` passes.

    What ``Grid.send_and_receive`` does, through the Grid's own ``push_messages`` and
    ``pull_messages``, with a poll interval that starts at 10 ms and grows slowly. A grid
    without them (a test double) gets ``send_and_receive``.
    """
    push = getattr(grid, "push_messages", None)
    pull = getattr(grid, "pull_messages", None)
    if push is None or pull is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(push(messages))
    start = time.monotonic()
    deadline = start + timeout
    replies: list[Message] = []
    while pending:
        got = list(pull(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        now = time.monotonic()
        if not pending or now >= deadline:
            break
        delay = min(_POLL_FIRST + _POLL_GROWTH * (now - start), _POLL_MOST)
        sleep(min(delay, deadline - now))
    return replies
