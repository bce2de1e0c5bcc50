"""Which clients may be behind rejected rounds, and which are excluded from the run.

The client behind a rejected round took part in every rejected round, so the clients
present in all of them are the suspects; while there are several, rounds sample about
half of the connected clients, and once a single client remains after at least two
rejected rounds it is excluded from the run. A client that its neighbours accuse of
sending masking shares that do not open is excluded at once when two or more distinct
neighbours accuse it (one accuser alone, who may be the liar, excludes no one). Either
way the evidence is the clients' own verdicts, never the server's word.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np

from sepals.common.log import log
from sepals.common.protocol import BAD_SHARES_REASON

#: Distinct accusers that exclude a client whose masking shares do not open.
ACCUSERS_TO_EXCLUDE = 2
_ACCUSED = re.compile(re.escape(BAD_SHARES_REASON) + r" ([0-9]+(?:, [0-9]+)*)$")


@dataclass
class SuspectSearch:
    """Which clients may be behind rejected rounds, and which are excluded from the run.

    Attributes:
        suspects: Node ids present in every rejected round since the search began
            (``None``: no rejected round yet).
        rejected_rounds: Rejected rounds since the search began.
        excluded: Node ids excluded from the run, with why.
        accusers: Per accused node id, the distinct nodes that said its masking shares
            do not open.

    """

    suspects: set[int] | None = None
    rejected_rounds: int = 0
    excluded: dict[int, str] = field(default_factory=dict)
    accusers: dict[int, set[int]] = field(default_factory=dict)

    def round_rejected(self, server_round: int, participants: Iterable[int]) -> int | None:
        """Note a rejected round; return the node it convicts, if one remains."""
        present = set(participants)
        self.suspects = present if self.suspects is None else self.suspects & present
        self.rejected_rounds += 1
        if not self.suspects:
            # More than one culprit, or a fault that moved: start the search again.
            log(WARNING, "round %s: rejected rounds share no client; search restarts", server_round)
            self.suspects, self.rejected_rounds = present, 1
        if len(self.suspects) == 1 and self.rejected_rounds >= 2:
            (node,) = self.suspects
            self.exclude(
                node,
                f"the only client in all of {self.rejected_rounds} rounds whose global model "
                "its verifiers rejected",
            )
            self.suspects, self.rejected_rounds = None, 0
            return node
        return None

    def accused(self, accused: int, accuser: int) -> bool:
        """Note an accusation; return whether ``accused`` is now excluded."""
        self.accusers.setdefault(accused, set()).add(accuser)
        if len(self.accusers[accused]) >= ACCUSERS_TO_EXCLUDE and accused not in self.excluded:
            count = len(self.accusers[accused])
            self.exclude(accused, f"{count} neighbours received masking shares that do not open")
            return True
        return False

    def exclude(self, node: int, why: str) -> None:
        """Exclude ``node`` from the rest of the run."""
        self.excluded[node] = why
        log(WARNING, "node %s is excluded from the run: %s", node, why)

    def narrowed(
        self, nodes: list[int], k: int, floor: int, rng: np.random.Generator
    ) -> list[int]:
        """``k`` of ``nodes`` to sample; while several clients are suspected, half of them.

        Excluded nodes are never sampled. While several clients are suspected, a round
        takes half of the suspects and fills up with cleared clients (absent from some
        rejected round, so not the culprit), at least ``floor`` nodes in all (the
        round's minimum, and ``T + 1`` under masking). A rejected round then halves the
        suspects; an adopted one clears no one (the culprit may have behaved), so the
        culprit is excluded after at most ``ceil(log2 n)`` more of its attacks.
        """
        eligible = [n for n in nodes if n not in self.excluded]
        if self.suspects is None or len(self.suspects) <= 1:
            picked = rng.choice(len(eligible), size=min(k, len(eligible)), replace=False)
            return sorted(eligible[i] for i in picked)
        suspects = [n for n in eligible if n in self.suspects]
        cleared = [n for n in eligible if n not in self.suspects]
        order = rng.permutation(len(suspects))
        half = math.ceil(len(suspects) / 2)
        size = min(len(eligible), max(k, floor))
        fill = rng.permutation(len(cleared))[: max(size - half, 0)]
        chosen = [suspects[i] for i in order[:half]] + [cleared[i] for i in fill]
        # Too few cleared clients to reach the floor: take more suspects.
        chosen += [suspects[i] for i in order[half : half + max(floor - len(chosen), 0)]]
        log(
            INFO,
            "sampling %s of %s suspected clients (and %s cleared) while the search narrows",
            sum(1 for n in chosen if n in self.suspects),
            len(suspects),
            sum(1 for n in chosen if n not in self.suspects),
        )
        return sorted(chosen)


def accusations(reason: str) -> list[int]:
    """The node ids a ``bad mask shares from node ...`` reason names (empty: none)."""
    match = _ACCUSED.match(reason)
    return [int(x) for x in match.group(1).split(", ")] if match else []
