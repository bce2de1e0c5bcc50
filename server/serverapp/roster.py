"""Who a reply comes from, and how much weight it may claim.

A :class:`NodeRoster` tells the server two things about the node behind a reply:

* its **name**, the ``client_id`` recorded in every :class:`RoundRecord`. In a
  deployment the name comes from ``node_names``, keyed by the Flower node id the
  SuperLink authenticated; what a client *claims* in its reply is ignored. In a
  simulation the harness runs every client itself, so ``trust_claimed_names`` takes the
  claimed ``client-id``. With neither, the name is the node id as text. A strategy
  built without a roster uses :data:`UNCONFIGURED`, which takes claimed names as
  labels (the behaviour from before rosters), so a deployment must pass
  ``node_names`` for its names to mean anything.
* its **cap**, the most examples it may report (``num-examples`` of a train or an
  evaluate reply). A reply above its node's cap is excluded, so one client can never
  outweigh the others by claiming a huge dataset. Caps are set at provisioning in a
  deployment and from the partition sizes in a simulation; a node without its own cap
  gets ``default_cap``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from sepals.common.errors import SepalsError

# The cap of a node with no cap of its own, by default. It is above the training split
# of every bundled dataset (mnist5k: 4,000 examples, one client holding all of them),
# so a simulation runs unchanged, and it bounds any one reply's weight at 10,000.
# Deployments and simulations should pass a roster with each node's own cap.
DEFAULT_EXAMPLE_CAP = 10_000

# A client name: the rule `sepals provision` applies to the names it writes.
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class RosterError(SepalsError):
    """A reply cannot be attributed to a known client (its reason is safe to log)."""


def _check_cap(what: str, cap: object) -> int:
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {cap!r}")
    return cap


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not CLIENT_NAME.fullmatch(name):
        raise ValueError(
            f"{what} must be a client name of 1-63 letters, digits, '_', '.' or '-' "
            f"(starting with a letter or digit), got {name!r}"
        )
    return name


@dataclass(frozen=True)
class NodeRoster:
    """Names and example caps of the nodes a server accepts replies from.

    Attributes:
        default_cap: Most ``num-examples`` a node without its own cap may report.
        caps: Client name -> its own cap.
        node_names: Authenticated Flower node id -> client name (deployment). When it
            is non-empty, a reply from any other node is refused as an unknown node.
        trust_claimed_names: Take the ``client-id`` a reply claims as its name
            (simulation only, where the harness runs every client itself). Excludes
            ``node_names``.

    """

    default_cap: int = DEFAULT_EXAMPLE_CAP
    caps: Mapping[str, int] = field(default_factory=dict)
    node_names: Mapping[int, str] = field(default_factory=dict)
    trust_claimed_names: bool = False

    def __post_init__(self) -> None:
        _check_cap("default_cap", self.default_cap)
        if not isinstance(self.trust_claimed_names, bool):
            raise ValueError(
                f"trust_claimed_names must be a bool, got {self.trust_claimed_names!r}"
            )
        caps = {
            _check_name("a cap's client name", k): _check_cap(f"the cap of {k!r}", v)
            for k, v in dict(self.caps).items()
        }
        names: dict[int, str] = {}
        for node, name in dict(self.node_names).items():
            if not isinstance(node, int) or isinstance(node, bool) or node < 0:
                raise ValueError(f"node ids must be integers >= 0, got {node!r}")
            names[node] = _check_name(f"the name of node {node}", name)
        if names and self.trust_claimed_names:
            raise ValueError(
                "node_names and trust_claimed_names exclude each other: a deployment names "
                "nodes by their authenticated id, a simulation trusts its own clients"
            )
        object.__setattr__(self, "caps", MappingProxyType(caps))
        object.__setattr__(self, "node_names", MappingProxyType(names))

    def name_of(self, node_id: int, claimed: object) -> str:
        """The name of the client behind ``node_id``; ``claimed`` is what its reply says.

        Raises:
            RosterError: the node is not in a non-empty ``node_names``, or (with
                ``trust_claimed_names``) the claimed id is not a valid client name.

        """
        if self.node_names:
            name = self.node_names.get(node_id)
            if name is None:
                raise RosterError("unknown node")
            return name
        if self.trust_claimed_names:
            if not isinstance(claimed, str) or not CLIENT_NAME.fullmatch(claimed):
                raise RosterError(
                    "client-id must be a client name of 1-63 letters, digits, '_', '.' or '-'"
                )
            return claimed
        return str(node_id)

    def cap_of(self, name: str) -> int:
        """The most examples the client ``name`` may report."""
        return self.caps.get(name, self.default_cap)


# The roster of a strategy built without one: claimed names, as before rosters existed
# (``sepals provision`` and the simulation harness both issue names that match
# :data:`CLIENT_NAME`), and the default cap for everyone.
UNCONFIGURED = NodeRoster(trust_claimed_names=True)
