"""``STATE/nodes.json``: which authenticated node is which provisioned client.

``sepals-server`` registers every provisioned node key with the SuperLink and writes the
node id Flower assigned to each, keyed to the client name of its key. The ServerApp
reads it to name each reply's sender by its authenticated key (never by the
``client-id`` the reply claims) and to apply that client's caps.
"""

from __future__ import annotations

import json
from pathlib import Path

NODES_FILE = "nodes.json"


def read_node_names(state_dir: Path) -> dict[int, str]:
    """The node id -> client name map in ``state_dir`` (empty if there is none).

    Raises:
        ValueError: the file is malformed.

    """
    path = state_dir / NODES_FILE
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not a node map: {exc}") from exc
