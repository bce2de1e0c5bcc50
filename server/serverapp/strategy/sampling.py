"""Stable node order for reproducible sampling, and the simulation's node keys.

Flower gives nodes random ids, so a seeded draw over node ids would differ from run to
run; ordering the connected nodes by stable keys first makes the same seed sample the
same clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import WARNING

from flwr.serverapp import Grid

from sepals.common.log import log
from sepals.server.serverapp.strategy.rounds import NodeOrder


def stable_order(grid: Grid, nodes: list[int], node_order: NodeOrder | None) -> list[int]:
    """``nodes`` sorted by their ``node_order`` keys (by node id without one).

    Keys that are missing for some node, or not distinct, cannot order the nodes;
    then the node-id order is kept, with a WARNING (the run goes on, unreproducibly).
    """
    if node_order is None:
        return nodes
    try:
        keys = node_order(grid, nodes)
        missing = [n for n in nodes if n not in keys]
        if missing:
            raise ValueError(f"no stable key for {len(missing)} of {len(nodes)} nodes")
        if len({keys[n] for n in nodes}) != len(nodes):
            raise ValueError("stable keys are not distinct")
    except Exception as exc:  # sampling must go on
        reason = str(exc)[:200] or type(exc).__name__
        log(WARNING, "sampling by node id, not reproducible: %s", reason)
        return nodes
    return sorted(nodes, key=lambda n: keys[n])


def simulation_node_order(grid: Grid, node_ids: Sequence[int]) -> dict[int, str]:
    """Stable keys of simulated nodes: ``client-K`` for the node of partition ``K``.

    A :data:`NodeOrder` for Flower 1.41's simulation (``run_simulation`` and ``flwr
    run`` with the simulation runtime). Its ``InMemoryGrid`` holds the in-memory link
    state in which the simulation engine registered node ``K`` (``partition-id`` ``K``
    in the node's ``node_config``) as the ``K``-th node (``vce_api._register_nodes``);
    the link state keeps its nodes in registration order, which this reads. The keys
    are the ``client-id`` names that sepals' simulated clients report.

    Raises:
        TypeError: ``grid`` is not a simulation's in-memory grid.

    """
    state = getattr(grid, "state", None)
    get_node_info = getattr(state, "get_node_info", None)
    if get_node_info is None:
        raise TypeError(
            f"{type(grid).__name__} is not a simulation grid: its node ids carry no partition ids"
        )
    order = {int(info.node_id): pid for pid, info in enumerate(get_node_info())}
    return {n: f"client-{order[n]}" for n in node_ids if n in order}
