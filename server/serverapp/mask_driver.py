"""The message exchanges of pairwise masking, on the server (see :mod:`.masking`).

A masked round costs one exchange more than an unmasked one:

* ``train.mask_setup`` (round r): the sampled nodes get the members' share-encryption
  public keys; each answers with a fresh mask public key, a commitment to a fresh
  self-mask seed, and its shares sealed for its neighbours. This exchange also carries
  the unmask request of round r - 1 to its survivors (an ``unmask`` record beside the
  ``mask`` one, or a ``train.mask_unmask`` message to a survivor not sampled again), so
  removing one round's masks and setting up the next share one round trip.
* ``train`` (round r): each sharer gets the sharers, its neighbours' mask public keys
  and the shares sealed for it, and uploads its masked update.

The last round's unmask goes alone (``train.mask_unmask``). A node's share key is for the
whole run: the server learns it once, with ``train.mask_register``, the first time the
node is sampled (and again if the node comes back with a new one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from sepals.common.errors import MaskProtocolError, SepalsError
from sepals.common.log import log
from sepals.common.mask_prg import SlotVector
from sepals.common.masking import MaskParams
from sepals.common.protocol import (
    ERR_BUDGET_EXHAUSTED,
    KEY_MASK,
    KEY_SETUP_ERROR,
    KEY_UNMASK,
    MASK_REGISTER,
    MASK_SETUP,
    MASK_UNMASK,
)
from sepals.server.serverapp.masking import MaskRound
from sepals.server.serverapp.replies import ReplyRejected, sanitize_text

# (server round, node ids, message type, per-node records) -> signed messages
MessageFactory = Callable[[int, Sequence[int], str, Callable[[int], dict[str, Any]]], list[Message]]
# (grid, messages, timeout) -> replies
Exchange = Callable[[Grid, list[Message], float], list[Message]]
_KEY_BYTES = 32


@dataclass
class MaskOutcome:
    """What masking did in one round, for the round's record."""

    members: int = 0
    survivors: int = 0
    dropouts: int = 0
    abandoned: str | None = None
    seconds: float = 0.0
    declined: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class Unmasking:
    """A round whose masks are to be removed: its state, survivors and request body."""

    server_round: int
    mask_round: MaskRound
    body: dict[str, Any]


@dataclass
class SetUp:
    """A round set up for masking: its sharers (the nodes to train) and its state."""

    server_round: int
    sharers: list[int]
    mask_round: MaskRound | None
    outcome: MaskOutcome


def _error(msg: Message) -> tuple[int | None, str] | None:
    if not msg.has_error():
        return None
    code: Any = msg.error.code
    if not isinstance(code, int) or isinstance(code, bool):
        code = None
    return code, sanitize_text(msg.error.reason or f"error code {code}")


class MaskDriver:
    """Runs the masking exchanges of a strategy's rounds.

    Args:
        params: The plan's degree and threshold.
        federation_id: Returns the federation id (it seeds each round's graph).
        messages: Builds the signed messages of a round.
        exchange: Sends messages and collects their replies.
        timeout: Seconds each exchange waits for replies.
        min_clients: Sharers a round needs besides the threshold (``min_train_clients``).

    """

    def __init__(
        self,
        params: MaskParams,
        federation_id: Callable[[], str],
        messages: MessageFactory,
        exchange: Exchange,
        timeout: float,
        min_clients: int,
    ) -> None:
        self.params = params
        self._federation_id = federation_id
        self._messages = messages
        self._exchange = exchange
        self.timeout = timeout
        self.need = max(params.threshold, min_clients)
        self.share_keys: dict[int, bytes] = {}

    # ------------------------------------------------------------------ setup
    def _register(self, grid: Grid, server_round: int, nodes: Sequence[int]) -> None:
        """Learn the share keys of the ``nodes`` the server has none for."""
        unknown = [n for n in nodes if n not in self.share_keys]
        if not unknown:
            return
        messages = self._messages(server_round, unknown, MASK_REGISTER, lambda _n: {})
        for node, msg in self._replies(grid, messages):
            try:
                error = _error(msg)
                if error is not None:
                    raise ReplyRejected(error[1])
                self._learn_key(node, msg.content.config_records.get(KEY_MASK))
            except Exception as exc:
                self._left_out(server_round, MASK_REGISTER, node, exc)

    def _learn_key(self, node: int, record: Any) -> None:
        key = None if record is None else record.get("share-pk")
        if not isinstance(key, bytes) or len(key) != _KEY_BYTES:
            raise ReplyRejected("no share key in the reply")
        self.share_keys[node] = key

    def setup(
        self,
        grid: Grid,
        server_round: int,
        nodes: Sequence[int],
        unmasking: Unmasking | None = None,
    ) -> SetUp:
        """Set up ``server_round`` among ``nodes`` (and send ``unmasking``'s request along).

        Returns the sharers, which are the nodes to train; none if fewer than the round
        needs completed the setup (the round is then abandoned before anyone trains).
        """
        outcome = MaskOutcome()
        mask_round: MaskRound | None = None
        sharers: list[int] = []
        body: dict[str, Any] = {}
        if nodes:
            self._register(grid, server_round, nodes)
            members = {n: self.share_keys[n] for n in nodes if n in self.share_keys}
            mask_round = MaskRound(self.params, self._federation_id(), server_round)
            body = mask_round.start(members)
        survivors = set(unmasking.mask_round.survivors) if unmasking is not None else set()
        setup_nodes = sorted(mask_round.graph) if mask_round is not None else []

        def setup_records(node: int) -> dict[str, Any]:
            records: dict[str, Any] = {KEY_MASK: body}
            if unmasking is not None and node in survivors:
                records[KEY_UNMASK] = unmasking.body
            return records

        messages = self._messages(server_round, setup_nodes, MASK_SETUP, setup_records)
        alone = sorted(survivors - set(setup_nodes))
        if unmasking is not None and alone:
            messages += self._messages(
                unmasking.server_round,
                alone,
                MASK_UNMASK,
                lambda _n: {KEY_MASK: unmasking.body},
            )
        for node, msg in self._replies(grid, messages):
            t0 = time.perf_counter()
            if mask_round is not None and node in mask_round.graph:
                self._admit_setup(server_round, mask_round, node, msg, outcome)
            if unmasking is not None and node in survivors:
                key = KEY_UNMASK if node in setup_nodes else KEY_MASK
                self._admit_reveal(unmasking, node, msg, key)
            outcome.seconds += time.perf_counter() - t0
        if mask_round is not None:
            sharers = list(mask_round.close_sharing())
        outcome.members = len(sharers)
        if nodes and len(sharers) < self.need:
            outcome.abandoned = (
                f"{len(sharers)} clients completed the masking setup, fewer than the "
                f"{self.need} the round needs"
            )
            sharers = []
        return SetUp(server_round, sharers, mask_round, outcome)

    def _admit_setup(
        self, server_round: int, mask_round: MaskRound, node: int, msg: Message, out: MaskOutcome
    ) -> None:
        try:
            error = _error(msg)
            records = msg.content.config_records if error is None else {}
            failed = records.get(KEY_SETUP_ERROR)
            if failed is not None:
                code, reason = failed.get("code"), sanitize_text(str(failed.get("reason", "")))
                error = (code if isinstance(code, int) else None, reason)
            if error is not None:
                code, reason = error
                if code == ERR_BUDGET_EXHAUSTED:
                    out.declined.append((node, reason))
                    log(INFO, "round %s: node %s declined: %s", server_round, node, reason)
                    return
                raise ReplyRejected(reason)
            record = records.get(KEY_MASK)
            if record is None:
                raise ReplyRejected("setup reply lacks the 'mask' record")
            mask_round.admit_setup(node, record)
        except Exception as exc:
            # The node may have come back with a new share key (a restart loses it): it
            # registers again the next time it is sampled.
            self.share_keys.pop(node, None)
            self._left_out(server_round, MASK_SETUP, node, exc)

    def _admit_reveal(self, unmasking: Unmasking, node: int, msg: Message, key: str) -> None:
        try:
            error = _error(msg)
            if error is not None:
                raise ReplyRejected(error[1])
            record = msg.content.config_records.get(key)
            if record is None:
                raise ReplyRejected("no revealed shares in the reply")
            unmasking.mask_round.admit_reveal(node, record)
        except Exception as exc:
            self._left_out(unmasking.server_round, MASK_UNMASK, node, exc)

    # ------------------------------------------------------------------ unmask
    def unmasking(
        self, server_round: int, mask_round: MaskRound, uploaded: Sequence[int]
    ) -> tuple[Unmasking | None, MaskOutcome]:
        """The unmask request of a round whose accepted uploads came from ``uploaded``.

        ``None`` (with the reason in the outcome) when fewer than ``T`` survived: no
        secret could be rebuilt and every client would refuse to reveal.
        """
        body = mask_round.unmask_record(uploaded)
        outcome = MaskOutcome(survivors=len(mask_round.survivors), dropouts=len(mask_round.dropped))
        if len(mask_round.survivors) < self.params.threshold:
            outcome.abandoned = (
                f"{len(mask_round.survivors)} survivors, fewer than the threshold "
                f"{self.params.threshold}"
            )
            return None, outcome
        return Unmasking(server_round, mask_round, body), outcome

    def unmask_alone(self, grid: Grid, unmasking: Unmasking) -> None:
        """Send an unmask request that no next round's setup carries (the last round)."""
        self.setup(grid, unmasking.server_round + 1, [], unmasking)

    @staticmethod
    def offset(unmasking: Unmasking, slots: int, modulus: int) -> tuple[SlotVector | None, str]:
        """The slot offset that removes the round's masks, or ``None`` and why not."""
        try:
            return unmasking.mask_round.slot_offset(slots, modulus), ""
        except MaskProtocolError as exc:
            return None, sanitize_text(str(exc))

    # ------------------------------------------------------------------ helpers
    def _replies(self, grid: Grid, messages: list[Message]) -> list[tuple[int, Message]]:
        """Exchange ``messages``; the replies from the nodes they went to, once each."""
        if not messages:
            return []
        expected = {m.metadata.dst_node_id for m in messages}
        seen: set[int] = set()
        out = []
        for msg in self._exchange(grid, messages, self.timeout):
            node = msg.metadata.src_node_id
            if node not in expected or node in seen:
                log(WARNING, "masking reply from an unexpected node %s left out", node)
                continue
            seen.add(node)
            out.append((node, msg))
        return out

    @staticmethod
    def _left_out(server_round: int, stage: str, node: int, exc: Exception) -> None:
        if isinstance(exc, ReplyRejected | SepalsError):
            # A client's own error text may be empty; the log still says what failed.
            reason = sanitize_text(str(exc)) or f"{type(exc).__name__} with no reason given"
        else:
            reason = f"malformed reply ({type(exc).__name__})"
        log(WARNING, "round %s: %s of node %s left out: %s", server_round, stage, node, reason)
