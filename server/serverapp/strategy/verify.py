"""Clients check a round's candidate global model before the server adopts it.

The server cannot decrypt a sum, so it cannot tell a corrupted one (one flipped bit in
one client's ciphertext, a forged or replayed ciphertext, residues beyond the grid) from
a good one. The round's own clients can: a few of them, the *verifiers*, decrypt the
candidate and check it exactly as they would before training on it
(:meth:`sepals.common.codec.UpdateCodec.decode_aggregate`: finite, and every value within
what the round's bounded updates can sum to). The server adopts the candidate only if
more verifiers accept it than reject it, and at least one accepts; otherwise the round
aggregates nothing and the last good model stays, the only one the server ever sends,
evaluates or checkpoints. Honest verifiers agree (the check is deterministic on the
decrypted sum), so one lying verifier among :data:`VERIFIERS` decides nothing.

A rejected round also narrows the search for its cause
(:class:`~sepals.server.serverapp.strategy.suspects.SuspectSearch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from sepals.common.protocol import ERR_BAD_GLOBAL, VERIFY_GLOBAL
from sepals.server.serverapp.strategy.core import StrategyCore
from sepals.server.serverapp.strategy.grid_io import exchange

#: Verifiers per round (fewer when fewer clients were accepted).
VERIFIERS = 3


@dataclass(frozen=True)
class Verdict:
    """What the verifiers said of a round's candidate global model."""

    adopted: bool
    accepts: int
    rejects: int
    asked: int

    @property
    def reason(self) -> str:
        """One line for the round's record and log."""
        return (
            f"{self.rejects} of {self.asked} verifying clients rejected the candidate global "
            f"model ({self.accepts} accepted)"
        )


class AggregateVerification(StrategyCore):
    """The verification phase of the encrypted strategy (see the module docstring)."""

    def _verify(self, server_round: int, candidate: ArrayRecord, nodes: list[int]) -> Verdict:
        """Ask up to :data:`VERIFIERS` of ``nodes`` whether they accept ``candidate``."""
        grid = self._grid
        if grid is None or not nodes:
            # Only a strategy driven without a grid (a unit test) gets here.
            return Verdict(adopted=True, accepts=0, rejects=0, asked=0)
        pick = np.random.default_rng([self.federation.seed, server_round, 0x7E51F])
        count = min(VERIFIERS, len(nodes))
        verifiers = sorted(int(nodes[i]) for i in pick.choice(len(nodes), count, replace=False))
        messages = self._messages(server_round, candidate, verifiers, VERIFY_GLOBAL)
        replies: list[Message] = exchange(grid, messages, self.federation.round_timeout)
        accepts = sum(1 for m in replies if not m.has_error())
        rejects = sum(1 for m in replies if m.has_error() and m.error.code == ERR_BAD_GLOBAL)
        adopted = accepts > rejects and accepts >= 1
        return Verdict(adopted=adopted, accepts=accepts, rejects=rejects, asked=count)
