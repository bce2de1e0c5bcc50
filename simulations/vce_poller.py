"""A message poller for Flower 1.41's simulation engine that scales with the mail, not the nodes.

Flower 1.41's simulation engine (``flwr.server.superlink.fleet.vce.vce_api``) moves
messages from the in-memory LinkState to the backend's workers in a thread running
``add_messages_to_queue``: every 0.1 s it asks the state for each registered node's
next message. The state answers each question by scanning every stored message and
re-validating each one under a lock, so one pass costs ``nodes x messages`` checks. At
1,000 nodes and 100 messages in flight that loop keeps a whole core busy for the whole
run, which on a 2-core machine starves the Ray workers that do the training.

:func:`add_pending_messages_to_queue` does the same job: it first reads which nodes
have an undelivered message (one scan of the store) and asks the state only for those
nodes, through the same ``get_message_ins`` call Flower makes, so delivery, expiry
checks and the ``delivered_at`` stamp stay Flower's own. Being cheap, it scans every
20 ms instead of 0.1 s. :func:`install` swaps it in.

This leans on two Flower internals, pinned by ``flwr>=1.41,<1.42`` in
``pyproject.toml``: the module-level name ``vce_api.add_messages_to_queue`` (looked up
when the simulation starts its thread) and ``InMemoryLinkState``'s ``message_ins_store``
and ``lock``. :func:`install` checks both and leaves Flower untouched if either is
missing, so a Flower upgrade costs speed, never correctness.
"""

from __future__ import annotations

import threading
from logging import DEBUG
from queue import Queue
from typing import Any

from sepals.common.log import log

PINNED_FLOWER = "1.41."
# Seconds between scans. A scan costs one pass over the stored messages (not nodes x
# messages), so scanning every 20 ms is cheap; it shortens the wait of every message
# exchange, which a masked round has four of.
POLL_SECONDS = 0.02


def pending_nodes(state: Any) -> set[int]:
    """Node ids that have at least one undelivered message in ``state``."""
    with state.lock:
        return {
            msg.metadata.dst_node_id
            for msg in state.message_ins_store.values()
            if msg.metadata.delivered_at == ""
        }


def add_pending_messages_to_queue(
    state: Any, queue: Queue[Any], nodes_mapping: dict[int, int], f_stop: threading.Event
) -> None:
    """Put each simulated node's next message in ``queue`` until ``f_stop`` is set.

    Same signature and contract as Flower's ``add_messages_to_queue``.
    """
    nodes = set(nodes_mapping)
    while not f_stop.is_set():
        for node_id in sorted(pending_nodes(state) & nodes):
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(POLL_SECONDS)


def install() -> bool:
    """Use :func:`add_pending_messages_to_queue` in Flower's simulation engine.

    Returns:
        Whether it was installed: only on Flower 1.41.x, whose in-memory LinkState has
        the attributes the poller reads.

    """
    # Flower's simulation internals import Ray: they load only when a simulation starts.
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    version = str(getattr(flwr, "__version__", ""))
    probe = InMemoryLinkState.__init__.__code__.co_names
    if (
        not version.startswith(PINNED_FLOWER)
        or not hasattr(vce_api, "add_messages_to_queue")
        or "message_ins_store" not in probe
        or "lock" not in probe
    ):
        log(DEBUG, "Flower %s: keeping its own simulation message poller", version)
        return False
    vce_api.add_messages_to_queue = add_pending_messages_to_queue
    return True
