"""An in-process grid for tests: every node is a real ClientApp, replies can be lost."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Message, RecordDict


class LossyGrid:
    """In-process nodes; replies to chosen (message type, node) pairs are lost or late.

    ``lose`` maps a message type to nodes whose replies never arrive (the node still
    handles the message); ``late`` maps a message type to nodes whose replies arrive only
    with the replies of the next stage.
    """

    def __init__(self, app: Any, nodes: list[int]) -> None:
        self.app = app
        self.nodes = nodes
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in nodes
        }
        self.lose: dict[str, set[int]] = {}
        self.late: dict[str, set[int]] = {}
        self._held: list[Message] = []
        self.stages: list[str] = []
        self.before: Any = None  # called with each message before its node handles it

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> Any:
        replies, held = list(self._held), []
        self._held = []
        for msg in messages:
            kind = msg.metadata.message_type
            self.stages.append(kind)
            node = msg.metadata.dst_node_id
            if self.before is not None:
                self.before(msg, self.contexts[node])
            reply = self.app(message=msg, context=self.contexts[node])
            if node in self.lose.get(kind, set()):
                continue
            (held if node in self.late.get(kind, set()) else replies).append(reply)
        self._held = held
        return replies
