"""The simulation poller that asks only nodes with mail (sepals.simulations.vce_poller)."""

from __future__ import annotations

import threading
from queue import Queue
from types import SimpleNamespace
from typing import Any

from sepals.simulations import vce_poller


class FakeState:
    """The slice of Flower's InMemoryLinkState the poller touches, recording questions."""

    def __init__(self, destinations: list[int]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {
            f"m{i}": SimpleNamespace(metadata=SimpleNamespace(dst_node_id=d, delivered_at=""))
            for i, d in enumerate(destinations)
        }
        self.asked: list[int] = []

    def get_message_ins(self, node_id: int, limit: int | None) -> list[Any]:
        self.asked.append(node_id)
        with self.lock:
            for msg in self.message_ins_store.values():
                if msg.metadata.dst_node_id == node_id and msg.metadata.delivered_at == "":
                    msg.metadata.delivered_at = "now"
                    return [msg]
        return []


def _drain(state: FakeState, nodes: dict[int, int], seconds: float) -> list[Any]:
    queue: Queue[Any] = Queue()
    stop = threading.Event()
    th = threading.Thread(
        target=vce_poller.add_pending_messages_to_queue, args=(state, queue, nodes, stop)
    )
    th.start()
    stop.wait(seconds)
    stop.set()
    th.join(timeout=5)
    assert not th.is_alive()
    return [queue.get_nowait() for _ in range(queue.qsize())]


def test_every_message_is_delivered_once_and_only_nodes_with_mail_are_asked():
    nodes = {n: n for n in range(1000)}
    state = FakeState([3, 3, 500, 999, 12345])  # 12345 is no simulated node
    got = _drain(state, nodes, 0.5)
    assert sorted(m.metadata.dst_node_id for m in got) == [3, 3, 500, 999]
    assert set(state.asked) == {3, 500, 999}
    assert vce_poller.pending_nodes(state) == {12345}


def test_nothing_pending_asks_nobody():
    state = FakeState([])
    assert _drain(state, {1: 1, 2: 2}, 0.3) == []
    assert state.asked == []


def test_install_swaps_flowers_poller_on_the_pinned_version(monkeypatch):
    from flwr.server.superlink.fleet.vce import vce_api

    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    assert vce_poller.install() is True
    assert vce_api.add_messages_to_queue is vce_poller.add_pending_messages_to_queue


def test_install_leaves_another_flower_alone(monkeypatch):
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    monkeypatch.setattr(vce_api, "add_messages_to_queue", original)
    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    assert vce_poller.install() is False
    assert vce_api.add_messages_to_queue is original
