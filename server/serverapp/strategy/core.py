"""The state and plumbing that every phase of the encrypted strategy uses.

Settings and history, stable reproducible sampling, and the signed round messages; the
phases (masking, evaluation, training) are subclasses in this package.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from logging import DEBUG, INFO, WARNING
from time import sleep
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from sepals.common.codec import UpdateCodec
from sepals.common.federation import FederationConfig, sampled_per_round
from sepals.common.log import log
from sepals.common.masking import MaskParams
from sepals.common.protocol import (
    KEY_CONFIG,
    KEY_GLOBAL,
    RoundConfig,
)
from sepals.common.records import read_global_record
from sepals.server.serverapp.mask_driver import MaskDriver, SetUp
from sepals.server.serverapp.masking import MaskRound
from sepals.server.serverapp.replies import (
    sanitize_text,
)
from sepals.server.serverapp.roster import UNCONFIGURED, NodeRoster
from sepals.server.serverapp.strategy.grid_io import (
    exchange,
)
from sepals.server.serverapp.strategy.intake import (
    Intake,
    codec_max_clients,
    codec_quant_step,
)
from sepals.server.serverapp.strategy.replay import ReplayKeys
from sepals.server.serverapp.strategy.rounds import (
    DIGEST_BYTES,
    NodeOrder,
    RoundRecord,
    RoundSigner,
)
from sepals.server.serverapp.strategy.sampling import stable_order
from sepals.server.serverapp.strategy.suspects import SuspectSearch


class StrategyCore(Strategy):
    """Settings, history, sampling and signed round messages of the encrypted strategy.

    The round phases build on it: :class:`~.masked_round.MaskedRounds`,
    :class:`~.evaluation.FederatedEvaluation` and :class:`~.fedavg.EncryptedFedAvg`
    (training, and the arguments).
    """

    def __init__(
        self,
        codec: UpdateCodec,
        vector_length: int,
        federation: FederationConfig,
        on_round: Callable[[RoundRecord], None] | None = None,
        min_available_nodes: int | None = None,
        node_wait_timeout: float = 300.0,
        round_offset: int = 0,
        round_signer: RoundSigner | None = None,
        roster: NodeRoster | None = None,
        max_clients: int | None = None,
        node_order: NodeOrder | None = None,
        metric_higher_is_better: bool = True,
    ) -> None:
        if vector_length < 1:
            raise ValueError(f"vector_length must be >= 1, got {vector_length}")
        if round_offset < 0:
            raise ValueError(f"round_offset must be >= 0, got {round_offset}")
        if max_clients is not None and (
            not isinstance(max_clients, int) or isinstance(max_clients, bool) or max_clients < 1
        ):
            raise ValueError(f"max_clients must be an integer >= 1, got {max_clients!r}")
        bounds = [b for b in (codec_max_clients(codec), max_clients) if b is not None]
        self.max_clients: int | None = min(bounds) if bounds else None
        if self.max_clients is not None and federation.min_train_clients > self.max_clients:
            raise ValueError(
                f"min_train_clients={federation.min_train_clients} exceeds max_clients="
                f"{self.max_clients}: no round could ever aggregate"
            )
        self.roster = roster if roster is not None else UNCONFIGURED
        self.round_offset = round_offset
        self.round_signer = round_signer
        self.latest_global: ArrayRecord | None = None
        self.codec = codec
        self.vector_length = vector_length
        self.federation = federation
        self.on_round = on_round
        self.min_available_nodes = min_available_nodes or federation.min_train_clients
        self.node_wait_timeout = node_wait_timeout
        self.node_order = node_order
        self.metric_higher_is_better = metric_higher_is_better
        self.rng = np.random.default_rng(federation.seed)
        self.history: list[RoundRecord] = []
        self._current: RoundRecord | None = None
        self._t_round = 0.0
        self._t_eval = 0.0
        self._quant_step = codec_quant_step(codec)
        self._seen = ReplayKeys()
        self._legacy_digests: frozenset[bytes] = frozenset()
        self._train_sampled: tuple[int, frozenset[int]] | None = None
        self._eval_sampled: tuple[int, frozenset[int]] | None = None
        self.masking: MaskParams | None = None
        if federation.masking:
            if codec_quant_step(codec) is None:
                raise ValueError(
                    f"masking needs the BFV codec (integer slots), not {codec.name!r}; set "
                    "mask_neighbours and mask_threshold to 0 to turn it off"
                )
            self.masking = MaskParams(federation.mask_neighbours, federation.mask_threshold)
        self._driver: MaskDriver | None = None
        if self.masking is not None:
            self._driver = MaskDriver(
                self.masking,
                lambda: self.federation_id,
                self._mask_messages,
                exchange,
                federation.round_timeout,
                federation.min_train_clients,
            )
        self._mask_round: MaskRound | None = None
        self._grid: Grid | None = None
        self._prepared: tuple[SetUp, RoundRecord] | None = None
        self._last_round: int | None = None
        # Clients excluded from the run, and the search for the cause of rejected rounds.
        self.search = SuspectSearch()

    @property
    def current_round(self) -> RoundRecord | None:
        """The record of the round in progress (``None`` between rounds)."""
        return self._current

    @property
    def replay_keys(self) -> ReplayKeys:
        """Replay keys of every ciphertext accepted so far (refused if sent again)."""
        return self._seen.copy()

    def remember_replay_keys(self, keys: ReplayKeys) -> None:
        """Refuse ciphertexts with these replay keys from now on (restored from a checkpoint)."""
        self._seen.add(keys)

    @property
    def payload_digests(self) -> frozenset[bytes]:
        """SHA-256 digests of raw payloads from a checkpoint of an older sepals.

        Such a checkpoint kept no replay keys; a payload with one of these digests is
        still refused. They are kept in every later checkpoint.
        """
        return self._legacy_digests

    def remember_payload_digests(self, digests: Iterable[bytes]) -> None:
        """Refuse payloads with these raw SHA-256 digests (an older sepals' checkpoint).

        Raises:
            ValueError: a digest is not 32 bytes.

        """
        new = set()
        for digest in digests:
            if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
                raise ValueError(f"a payload digest must be {DIGEST_BYTES} bytes")
            new.add(digest)
        self._legacy_digests |= new

    # ------------------------------------------------------------------ helpers
    def summary(self) -> None:
        """Log the strategy settings."""
        log(
            INFO,
            "EncryptedFedAvg: codec=%s key=%s params=%s rounds=%s fraction_train=%s max_clients=%s",
            self.codec.name,
            self.codec.fingerprint_hex,
            self.vector_length,
            self.federation.rounds,
            self.federation.fraction_train,
            self.max_clients,
        )

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Sample ``max(minimum, ceil(fraction * connected))`` of the connected nodes.

        Never more than ``max_clients``. Waits up to ``node_wait_timeout`` for
        ``min_available_nodes`` to connect. If even ``minimum`` nodes are not there by
        then, nobody is sampled: a round that cannot reach its minimum would only make
        clients spend privacy budget for nothing.

        The nodes are ordered by their :attr:`node_order` keys before the draw, so
        the same keys, seed and history give the same sample whatever Flower's node ids.
        """
        deadline = time.monotonic() + self.node_wait_timeout
        need = max(minimum, self.min_available_nodes)
        last_log = 0.0
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= need or time.monotonic() > deadline:
                break
            if time.monotonic() - last_log > 10.0:
                log(INFO, "waiting for nodes: %s connected, %s wanted", len(nodes), need)
                last_log = time.monotonic()
            sleep(1.0)
        if len(nodes) < minimum:
            log(
                WARNING,
                "only %s nodes connected after %.0f s, fewer than the minimum %s; "
                "skipping this round",
                len(nodes),
                self.node_wait_timeout,
                minimum,
            )
            return []
        nodes = stable_order(grid, nodes, self.node_order)
        k = sampled_per_round(len(nodes), fraction, minimum)
        if self.max_clients is not None:
            k = min(k, self.max_clients)
        # A masked round needs at least T + 1 members: each then has T neighbours.
        floor = max(minimum, self.masking.threshold + 1 if self.masking is not None else 1)
        return self.search.narrowed(nodes, k, floor, self.rng)

    def _messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        node_ids: Sequence[int],
        message_type: str,
        records: Callable[[int], dict[str, Any]] | None = None,
    ) -> list[Message]:
        """Signed round messages, with each node's named ConfigRecords from ``records``."""
        cfg = RoundConfig.build(
            self.federation,
            server_round,
            self.codec.name,
            self.codec.fingerprint_hex,
            self.vector_length,
        )
        config = cfg.to_record_dict()
        if self.round_signer is not None:
            config = self.round_signer(message_type, config, arrays)
        signed = ConfigRecord(config)
        out = []
        for n in node_ids:
            content: dict[str, Any] = {KEY_GLOBAL: arrays, KEY_CONFIG: signed}
            if records is not None:
                content.update({k: ConfigRecord(v) for k, v in records(n).items()})
            out.append(Message(RecordDict(content), dst_node_id=n, message_type=message_type))
        return out

    def _mask_messages(
        self,
        server_round: int,
        nodes: Sequence[int],
        message_type: str,
        records: Callable[[int], dict[str, Any]],
    ) -> list[Message]:
        """Signed masking messages: the round config, an empty ``global`` and ``records``."""
        return self._messages(server_round, ArrayRecord(), nodes, message_type, records=records)

    @property
    def federation_id(self) -> str:
        """The federation id the round signer stamps (it seeds the masking graph)."""
        return str(getattr(self.round_signer, "federation_id", ""))

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop (``Strategy.start``); it also notes the run's last round.

        A masked round sends its unmask request with the next round's setup, except in
        the last round of the run.
        """
        self._last_round = self.round_offset + num_rounds
        self._prepared = None
        return super().start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    @staticmethod
    def _global_bytes(arrays: ArrayRecord) -> int:
        parsed = read_global_record(arrays)
        return 0 if parsed is None else len(parsed[0])

    @staticmethod
    def _expected(sampled: tuple[int, frozenset[int]] | None, server_round: int) -> Intake:
        if sampled is not None and sampled[0] == server_round:
            return Intake(expected=sampled[1])
        return Intake(expected=None)

    def _name_of(self, node: int, client_rec: Any) -> str:
        claimed = client_rec.get("client-id") if client_rec is not None else None
        name = self.roster.name_of(node, claimed)
        if self.roster.node_names and claimed is not None and claimed != name:
            log(
                DEBUG,
                "node %s claims client-id %s; recorded as %s",
                node,
                sanitize_text(claimed, 64),
                name,
            )
        return name
