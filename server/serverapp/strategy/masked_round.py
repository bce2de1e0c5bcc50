"""The masked round: setup with the train message, unmasking after the sum (SecAgg+).

Each masked round sends its nodes the masking setup before training and, once the
survivors are known, asks them for the shares that remove the dropped clients' masks;
the unmask request travels with the next round's setup.
"""

from __future__ import annotations

import time
from logging import WARNING
from typing import Any

from sepals.common.log import log
from sepals.server.serverapp.mask_driver import SetUp
from sepals.server.serverapp.strategy.core import StrategyCore
from sepals.server.serverapp.strategy.rounds import (
    RoundRecord,
)


class MaskedRounds(StrategyCore):
    """Masking setup and unmasking, for a strategy whose federation has masking on."""

    @staticmethod
    def _abandon_masking(record: RoundRecord | None, server_round: int, reason: str) -> None:
        if record is not None:
            record.mask_abandoned = reason
        log(
            WARNING, "round %s: masking abandoned, global model unchanged: %s", server_round, reason
        )

    def _note_setup(self, record: RoundRecord, setup: SetUp) -> None:
        """Record what a round's masking setup did."""
        record.masking = True
        record.mask_threshold = self.masking.threshold if self.masking is not None else 0
        record.mask_members = setup.outcome.members
        record.mask_seconds += setup.outcome.seconds
        record.declined.extend(setup.outcome.declined)
        if setup.outcome.abandoned is not None:
            self._abandon_masking(record, setup.server_round, setup.outcome.abandoned)

    def _unmask(self, server_round: int, survivors: list[int]) -> Any:
        """Remove the round's masks; return the slot offset, or ``None`` (abandoned).

        Only the clients whose update was accepted are survivors; every other sharer (no
        reply in time, declined, excluded) counts as dropped. Unless this is the run's
        last round, the unmask request travels with the next round's setup, for which
        the next round's nodes are sampled now.
        """
        record, mask_round, grid, driver = self._current, self._mask_round, self._grid, self._driver
        self._mask_round = None
        if mask_round is None or grid is None or driver is None:
            self._abandon_masking(record, server_round, "no masking setup for this round")
            return None
        unmasking, outcome = driver.unmasking(server_round, mask_round, survivors)
        if record is not None:
            record.mask_survivors, record.mask_dropouts = outcome.survivors, outcome.dropouts
        if self._last_round is not None and server_round < self._last_round:
            following = RoundRecord(round=server_round + 1, codec=self.codec.name)
            nodes = self._sample(
                grid, self.federation.fraction_train, self.federation.min_train_clients
            )
            following.sampled = len(nodes)
            setup = driver.setup(grid, server_round + 1, nodes, unmasking)
            self._note_setup(following, setup)
            self._prepared = (setup, following)
        elif unmasking is not None:
            driver.unmask_alone(grid, unmasking)
        if unmasking is None:
            self._abandon_masking(record, server_round, outcome.abandoned or "too few survivors")
            return None
        codec: Any = self.codec
        t0 = time.perf_counter()
        offset, reason = driver.offset(
            unmasking, codec.slot_count(self.vector_length), codec.plain_modulus
        )
        if record is not None:
            record.mask_seconds += time.perf_counter() - t0
        if offset is None:
            self._abandon_masking(record, server_round, reason)
        return offset
