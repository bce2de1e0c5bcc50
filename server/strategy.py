"""Encrypted federated averaging on Flower's Message API.

:class:`EncryptedFedAvg` is a Flower ``Strategy``: it reuses ``Strategy.start`` (the
round loop) and implements sampling, validation and aggregation itself, because the
server only ever holds ciphertexts. Each client sends ``n_i * w_i`` encrypted; the
server adds the ciphertexts and keeps ``sum(n_i)`` in the clear; clients decrypt the
sum and divide. With the plain codec the very same code runs FedAvg in the clear.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from logging import DEBUG, ERROR, INFO, WARNING
from time import sleep
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from sepals.common.codec import UpdateCodec
from sepals.common.config import EncryptionConfig, FederationConfig, sampled_per_round
from sepals.common.errors import SepalsError
from sepals.common.fairness import client_spread
from sepals.common.log import log
from sepals.common.masking import MaskParams
from sepals.common.protocol import (
    ERR_BUDGET_EXHAUSTED,
    KEY_CLIENT,
    KEY_CONFIG,
    KEY_GLOBAL,
    KEY_MASK,
    KEY_METRICS,
    KEY_UPDATE,
    RoundConfig,
)
from sepals.common.records import KEY_PAYLOAD, global_record, payload_from_array, read_global_record
from sepals.server.mask_driver import MaskDriver, SetUp
from sepals.server.masking import MaskRound
from sepals.server.replies import (
    EvalMetrics,
    ReplyRejected,
    parse_accountant,
    parse_eval_metrics,
    parse_train_metrics,
    sanitize_text,
)
from sepals.server.roster import UNCONFIGURED, NodeRoster, RosterError

DIGEST_BYTES = 32  # SHA-256 of an accepted payload

# Stable sampling keys: (grid, connected node ids) -> a key per node id.
NodeOrder = Callable[[Grid, Sequence[int]], Mapping[int, str]]


@dataclass(frozen=True)
class ClientRoundReport:
    """Plaintext metadata one client reported in one round (checked, never raw).

    ``client_id`` is the name the server's :class:`~sepals.server.roster.NodeRoster`
    gives the node (in a deployment, the authenticated one), not what the client claims.
    """

    node_id: int
    client_id: str
    num_examples: int
    epsilon: float | None
    epsilon_replace_one: float | None
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    total_steps: int
    rounds_participated: int
    accountant: str | None
    quant_error: float | None = None


@dataclass
class RoundRecord:
    """What the server observed in one round (all plaintext metadata).

    ``declined``, ``excluded`` and ``eval_excluded`` hold ``(node id, reason)``; every
    reason is vetted or sanitized text (printable, at most 200 characters).

    With masking: ``mask_members`` clients shared their secrets, ``mask_survivors`` of
    them had their update added and ``mask_dropouts`` did not; ``masks_removed`` says
    whether the masks were removed (the round aggregated), ``mask_abandoned`` why not,
    and ``mask_seconds`` is the server's time in the masking stages' own work.

    ``federated_spread`` is the spread across the evaluating clients of their federated
    evaluation metric (accuracy, else the app's metric): count, min, median, max and
    the mean of the worst 10% (:class:`~sepals.common.fairness.ClientSpread`). Only the
    spread is kept, not which node reported which value.
    """

    round: int
    codec: str = ""
    sampled: int = 0
    replied: int = 0
    accepted: int = 0
    aggregated: bool = False
    declined: list[tuple[int, str]] = field(default_factory=list)
    excluded: list[tuple[int, str]] = field(default_factory=list)
    upload_bytes: int = 0
    download_bytes: int = 0
    weight_total: float = 0.0
    max_epsilon: float | None = None
    max_epsilon_replace_one: float | None = None
    quant_error: float | None = None
    federated_loss: float | None = None
    federated_accuracy: float | None = None
    federated_metric: float | None = None
    federated_spread: dict[str, Any] | None = None
    evaluated: int = 0
    eval_excluded: list[tuple[int, str]] = field(default_factory=list)
    train_seconds: float = 0.0
    evaluate_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    masking: bool = False
    mask_threshold: int = 0
    mask_members: int = 0
    mask_survivors: int = 0
    mask_dropouts: int = 0
    masks_removed: bool = False
    mask_abandoned: str | None = None
    mask_seconds: float = 0.0
    clients: list[ClientRoundReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        out = {k: v for k, v in self.__dict__.items() if k != "clients"}
        out["clients"] = [c.__dict__ for c in self.clients]
        return out


# Adds the operator's fields (federation id, signature) to a round config before it is
# sent: ``(message_type, config, global_arrays) -> config``. See sepals.common.plan.
RoundSigner = Callable[[str, dict[str, Any], ArrayRecord], dict[str, Any]]


def _codec_config(codec: UpdateCodec) -> EncryptionConfig | None:
    config = codec.encryption
    return config if config is not None and config.scheme != "none" else None


def codec_max_clients(codec: UpdateCodec) -> int | None:
    """Most updates ``codec`` may add into one aggregate (``None``: the plain codec)."""
    config = _codec_config(codec)
    return None if config is None else config.max_clients


def _codec_quant_step(codec: UpdateCodec) -> float | None:
    config = _codec_config(codec)
    return config.quant_step if config is not None and config.scheme == "bfv" else None


def _src_node(msg: Message) -> int:
    try:
        node = msg.metadata.src_node_id
        return node if isinstance(node, int) and not isinstance(node, bool) else -1
    except Exception:
        return -1


def _error_of(msg: Message) -> tuple[int | None, str] | None:
    """``(code, sanitized reason)`` of an error reply, ``None`` for a normal reply."""
    if not msg.has_error():
        return None
    code: Any = msg.error.code
    if not isinstance(code, int) or isinstance(code, bool):
        code = None
    reason = msg.error.reason
    text = sanitize_text(reason) if reason else f"error code {code}"
    return code, text


def _reason_of(exc: Exception) -> str:
    """A short, safe reason for excluding a reply whose handling raised ``exc``."""
    if isinstance(exc, ReplyRejected | RosterError):
        return sanitize_text(str(exc))
    if isinstance(exc, SepalsError):
        return sanitize_text(f"{type(exc).__name__}: {exc}")
    return "malformed reply"


def _weighted_mean(values: list[float], weights: list[int]) -> float:
    """Weighted mean, kept inside ``[min(values), max(values)]`` despite rounding."""
    total = sum(weights)
    mean = sum(v * (w / total) for v, w in zip(values, weights, strict=True))
    return min(max(mean, min(values)), max(values))


@dataclass
class _Intake:
    """What one phase (train or evaluate) of a round has accepted so far."""

    expected: frozenset[int] | None  # the sampled nodes, when this strategy sampled them
    nodes: set[int] = field(default_factory=set)
    names: set[str] = field(default_factory=set)
    digests: set[bytes] = field(default_factory=set)

    def admit_node(self, node: int) -> None:
        if self.expected is not None and node not in self.expected:
            raise ReplyRejected("reply from a node that was not sampled this round")
        if node in self.nodes:
            raise ReplyRejected("second reply from the same node this round")
        self.nodes.add(node)

    def check_name(self, name: str) -> None:
        if name in self.names:
            raise ReplyRejected("second reply for the same client this round")


@dataclass(frozen=True)
class _Admitted:
    loaded: list[Any]
    nbytes: int
    digest: bytes
    report: ClientRoundReport


class EncryptedFedAvg(Strategy):
    """FedAvg over encrypted (or plain) weighted updates.

    Args:
        codec: Server-side codec; for CKKS it must hold only the public context.
        vector_length: Number of model parameters every update must encode.
        federation: Rounds, sampling and local-training settings.
        on_round: Called with each finished :class:`RoundRecord` (metrics sink).
        min_available_nodes: Nodes to wait for before sampling (default: the federation's
            ``min_train_clients``).
        node_wait_timeout: Seconds to wait for them before sampling whoever is there.
        round_offset: Rounds already done before this run (a resumed federation):
            Flower's round ``r`` is federation round ``r + round_offset``.
        round_signer: Adds the operator's federation id and signature to every round
            config (clients refuse unsigned rounds when their plan names a key).
        roster: Names and example caps of the nodes. The default,
            :data:`~sepals.server.roster.UNCONFIGURED`, keeps the behaviour from before
            rosters: the ``client-id`` a reply claims is its name, a label with no
            authority (no cap of its own), and every count is capped at
            :data:`~sepals.server.roster.DEFAULT_EXAMPLE_CAP`. A deployment passes
            ``node_names`` so that names are authenticated, and a simulation the
            partition sizes as ``caps``.
        max_clients: Most nodes sampled and updates added per round (default: the
            codec's ``EncryptionConfig.max_clients``; no bound for the plain codec). When
            both are set, the smaller one holds.

    A round changes the global model only if at least ``min_train_clients`` valid updates
    arrive before the round timeout. Sampled nodes that never reply (dropped, killed,
    partitioned) are counted as ``missing`` and the round goes on without them.

    Every reply is checked on its own, and anything wrong with it (any exception while
    handling it, too) excludes that reply alone, with a short reason in the round's
    ``excluded`` (``eval_excluded`` for evaluation); the round goes on with the others.
    A train reply is excluded unless: it comes from a sampled node, once per round, that
    the roster knows; ``num-examples`` is an ``int`` in ``[1, cap]`` of that node;
    every privacy and timing figure is finite and in range; its payload is valid for
    this codec, key and model size and is not byte-identical to a payload accepted in
    this round or any earlier one (SHA-256 digests, kept across restarts in the
    checkpoint); and fewer than ``max_clients`` updates were accepted before it. An
    evaluation reply needs ``num-examples`` in ``[1, cap]``, a finite ``loss >= 0``
    and ``accuracy`` in ``[0, 1]``.

    What a registered client that is malicious can still do: send any update the codec
    accepts and claim any count up to its cap. Each value it encodes (``n * w``) is
    bounded only by ``update_bound`` (BFV) or ``max_update_magnitude`` (CKKS; the plain
    codec has no bound), so it can move every coordinate of the new global model by up
    to that bound divided by the round's ``weight_total``, and dilute the honest updates
    by up to ``cap / weight_total``. Nothing proves that a ciphertext was made honestly,
    by DP-SGD on the client's own data: the server checks a payload's form, key and
    length, never its content, and the privacy figures a client reports are its own
    claims. Since all clients share the decryption key, one that obtains another's
    ciphertext can also re-encrypt its contents into fresh bytes, which the duplicate
    check does not catch. Its evaluation reports can likewise shift the federated loss
    and accuracy within their ranges, at weight up to its cap.

    Sampling draws from ``numpy.random.default_rng(federation.seed)`` over the connected
    nodes sorted by :attr:`node_order`'s stable keys (default: by Flower node id). Flower
    gives nodes random ids, so a reproducible run (same seed, same clients sampled at
    any fraction) sets :attr:`node_order`; a simulation passes
    :func:`simulation_node_order`.

    """

    node_order: NodeOrder | None = None
    metric_higher_is_better: bool = True
    """Whether an app's own metric is better when higher (worst 10% = lowest values)."""

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
        self.rng = np.random.default_rng(federation.seed)
        self.history: list[RoundRecord] = []
        self._current: RoundRecord | None = None
        self._t_round = 0.0
        self._t_eval = 0.0
        self._quant_step = _codec_quant_step(codec)
        self._digests: set[bytes] = set()
        self._train_sampled: tuple[int, frozenset[int]] | None = None
        self._eval_sampled: tuple[int, frozenset[int]] | None = None
        self.masking: MaskParams | None = None
        if federation.masking:
            if _codec_quant_step(codec) is None:
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

    @property
    def current_round(self) -> RoundRecord | None:
        """The record of the round in progress (``None`` between rounds)."""
        return self._current

    @property
    def payload_digests(self) -> frozenset[bytes]:
        """SHA-256 digests of every payload accepted so far (refused if sent again)."""
        return frozenset(self._digests)

    def remember_payload_digests(self, digests: Iterable[bytes]) -> None:
        """Refuse these payload digests from now on (restored from a checkpoint).

        Raises:
            ValueError: a digest is not 32 bytes.

        """
        new = set()
        for digest in digests:
            if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
                raise ValueError(f"a payload digest must be {DIGEST_BYTES} bytes")
            new.add(digest)
        self._digests |= new

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
        nodes = self._stable_order(grid, nodes)
        k = sampled_per_round(len(nodes), fraction, minimum)
        if self.max_clients is not None:
            k = min(k, self.max_clients)
        chosen = self.rng.choice(len(nodes), size=k, replace=False)
        return sorted(nodes[i] for i in chosen)

    def _stable_order(self, grid: Grid, nodes: list[int]) -> list[int]:
        """``nodes`` sorted by their :attr:`node_order` keys (by node id without one).

        Keys that are missing for some node, or not distinct, cannot order the nodes;
        then the node-id order is kept, with a WARNING (the run goes on, unreproducibly).
        """
        if self.node_order is None:
            return nodes
        try:
            keys = self.node_order(grid, nodes)
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

    @property
    def federation_id(self) -> str:
        """The federation id the round signer stamps (it seeds the masking graph)."""
        return str(getattr(self.round_signer, "federation_id", ""))

    @staticmethod
    def _abandon_masking(record: RoundRecord | None, server_round: int, reason: str) -> None:
        if record is not None:
            record.mask_abandoned = reason
        log(
            WARNING, "round %s: masking abandoned, global model unchanged: %s", server_round, reason
        )

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

    def _mask_messages(
        self,
        server_round: int,
        nodes: Sequence[int],
        message_type: str,
        records: Callable[[int], dict[str, Any]],
    ) -> list[Message]:
        """Signed masking messages: the round config, an empty ``global`` and ``records``."""
        return self._messages(server_round, ArrayRecord(), nodes, message_type, records=records)

    @staticmethod
    def _global_bytes(arrays: ArrayRecord) -> int:
        parsed = read_global_record(arrays)
        return 0 if parsed is None else len(parsed[0])

    @staticmethod
    def _expected(sampled: tuple[int, frozenset[int]] | None, server_round: int) -> _Intake:
        if sampled is not None and sampled[0] == server_round:
            return _Intake(expected=sampled[1])
        return _Intake(expected=None)

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

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the round config and the encrypted global model."""
        server_round += self.round_offset
        self._t_round = time.perf_counter()
        self._grid = grid
        prepared, self._prepared = self._prepared, None
        mask_records: Callable[[int], dict[str, Any]] | None = None
        self._mask_round = None
        if prepared is not None and prepared[0].server_round == server_round:
            # Sampled and set up with the previous round's unmask request.
            setup, record = prepared
            self._current = record
            nodes = setup.sharers
        else:
            record = RoundRecord(round=server_round, codec=self.codec.name)
            self._current = record
            nodes = self._sample(
                grid, self.federation.fraction_train, self.federation.min_train_clients
            )
            record.sampled = len(nodes)
            if self._driver is not None:
                setup = self._driver.setup(grid, server_round, nodes)
                self._note_setup(record, setup)
                nodes = setup.sharers
        if self._driver is not None:
            mask_round = setup.mask_round if nodes else None
            self._mask_round = mask_round
            if mask_round is not None:

                def mask_records(node: int) -> dict[str, Any]:
                    return {KEY_MASK: mask_round.train_record(node)}

        self._train_sampled = (server_round, frozenset(nodes))
        record.download_bytes += self._global_bytes(arrays) * len(nodes)
        log(INFO, "round %s: training on %s nodes", server_round, len(nodes))
        return self._messages(server_round, arrays, nodes, MessageType.TRAIN, mask_records)

    def _admit_train(self, msg: Message, node: int, intake: _Intake) -> _Admitted:
        """Check one train reply; raise (any exception) to exclude it."""
        intake.admit_node(node)
        content = msg.content
        if KEY_UPDATE not in content.array_records or KEY_METRICS not in content.metric_records:
            raise ReplyRejected(
                "reply lacks the 'update' ArrayRecord or the 'metrics' MetricRecord"
            )
        client_rec = content.config_records.get(KEY_CLIENT)
        name = self._name_of(node, client_rec)
        intake.check_name(name)
        metrics = parse_train_metrics(
            content.metric_records[KEY_METRICS], self.roster.cap_of(name), self._quant_step
        )
        accountant = parse_accountant(
            client_rec.get("accountant") if client_rec is not None else None
        )
        update = content.array_records[KEY_UPDATE]
        if KEY_PAYLOAD not in update:
            raise ReplyRejected("update record lacks 'payload'")
        try:
            payload = payload_from_array(update[KEY_PAYLOAD])
        except Exception as exc:
            raise ReplyRejected("update is not a sepals payload array") from exc
        digest = hashlib.sha256(payload).digest()
        if digest in self._digests or digest in intake.digests:
            raise ReplyRejected("duplicate ciphertext")
        try:
            loaded = self.codec.validate(payload, self.vector_length)
        except SepalsError:
            raise
        except Exception as exc:
            raise ReplyRejected("malformed payload") from exc
        if self.max_clients is not None and len(intake.digests) >= self.max_clients:
            raise ReplyRejected(
                f"max_clients={self.max_clients} updates already accepted this round"
            )
        report = ClientRoundReport(
            node_id=node, client_id=name, accountant=accountant, **asdict(metrics)
        )
        return _Admitted(loaded, len(payload), digest, report)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply on its own, exclude bad ones with a reason, add the rest."""
        server_round += self.round_offset
        if self._current is None or self._current.round != server_round:
            self._current = RoundRecord(round=server_round, codec=self.codec.name)
        record = self._current
        intake = self._expected(self._train_sampled, server_round)
        loaded_all: list[list[Any]] = []
        weight_total = 0
        for msg in replies:
            record.replied += 1
            node = _src_node(msg)
            admitted: _Admitted | None = None
            try:
                error = _error_of(msg)
                if error is None:
                    admitted = self._admit_train(msg, node, intake)
            except Exception as exc:
                reason = _reason_of(exc)
                if not isinstance(exc, SepalsError):
                    log(DEBUG, "round %s: node %s: %s", server_round, node, type(exc).__name__)
                record.excluded.append((node, reason))
                log(WARNING, "round %s: excluding node %s: %s", server_round, node, reason)
                continue
            if admitted is None:
                code, reason = error if error is not None else (None, "malformed reply")
                if code == ERR_BUDGET_EXHAUSTED:
                    record.declined.append((node, reason))
                    log(INFO, "round %s: node %s declined: %s", server_round, node, reason)
                else:
                    record.excluded.append((node, reason))
                    log(WARNING, "round %s: node %s failed: %s", server_round, node, reason)
                continue
            intake.digests.add(admitted.digest)
            intake.names.add(admitted.report.client_id)
            loaded_all.append(admitted.loaded)
            weight_total += admitted.report.num_examples
            record.upload_bytes += admitted.nbytes
            record.clients.append(admitted.report)
        # Accepted payloads are refused from now on, whether or not this round adds them.
        self._digests |= intake.digests
        record.accepted = len(loaded_all)
        eps = [c.epsilon for c in record.clients if c.epsilon is not None]
        record.max_epsilon = max(eps) if eps else None
        eps_r1 = [
            c.epsilon_replace_one for c in record.clients if c.epsilon_replace_one is not None
        ]
        record.max_epsilon_replace_one = max(eps_r1) if eps_r1 else None
        record.train_seconds = time.perf_counter() - self._t_round
        missing = record.sampled - record.replied
        if missing > 0:
            log(WARNING, "round %s: %s sampled nodes did not reply in time", server_round, missing)
        if len(loaded_all) < max(1, self.federation.min_train_clients):
            log(
                WARNING,
                "round %s: %s valid updates, fewer than the minimum %s; the global model "
                "is unchanged",
                server_round,
                len(loaded_all),
                self.federation.min_train_clients,
            )
            return None, self._train_metrics(record)
        offset = None
        if self.masking is not None:
            accepted_nodes = [c.node_id for c in record.clients]
            offset = self._unmask(server_round, accepted_nodes)
            if offset is None:
                return None, self._train_metrics(record)
        t0 = time.perf_counter()
        try:
            payload = self.codec.aggregate_loaded(loaded_all, self.vector_length, offset)
        except Exception as exc:
            # Every payload passed validation, so this is a server-side fault; the round
            # still completes, without a new model.
            log(
                ERROR,
                "round %s: adding %s validated updates failed (%s); the global model is unchanged",
                server_round,
                len(loaded_all),
                type(exc).__name__,
            )
            return None, self._train_metrics(record)
        record.aggregate_seconds = time.perf_counter() - t0
        record.weight_total = float(weight_total)
        record.aggregated = True
        record.masks_removed = offset is not None
        self.latest_global = global_record(payload, float(weight_total))
        errors = [c.quant_error for c in record.clients]
        if errors and all(e is not None for e in errors):
            # Each client's rounding error is at most e_i on n_i * w_i, so the averaged
            # model is off by at most sum(e_i) / sum(n_i) in every coordinate.
            bound = sum(e for e in errors if e is not None) / weight_total
            record.quant_error = bound if math.isfinite(bound) else None
        log(
            INFO,
            "round %s: aggregated %s updates (%s declined, %s excluded)%s",
            server_round,
            record.accepted,
            len(record.declined),
            len(record.excluded),
            (
                f"; masked: {record.mask_survivors} of {record.mask_members} survived, "
                f"{record.mask_dropouts} dropped, T={record.mask_threshold}, masks removed"
                if record.masks_removed
                else ""
            ),
        )
        return self.latest_global, self._train_metrics(record)

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

    @staticmethod
    def _train_metrics(record: RoundRecord) -> MetricRecord:
        values: dict[str, int | float | list[int] | list[float]] = {
            "accepted": record.accepted,
            "declined": len(record.declined),
            "excluded": len(record.excluded),
            "upload-bytes": record.upload_bytes,
        }
        if record.max_epsilon is not None:
            values["max-epsilon"] = record.max_epsilon
        if record.max_epsilon_replace_one is not None:
            values["max-epsilon-replace-one"] = record.max_epsilon_replace_one
        if record.quant_error is not None:
            values["quant-error"] = record.quant_error
        return MetricRecord(values)

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask a fraction of nodes to evaluate the decrypted global model locally."""
        server_round += self.round_offset
        self._t_eval = time.perf_counter()
        fraction = self.federation.fraction_evaluate
        self._eval_sampled = (server_round, frozenset())
        if fraction <= 0.0 or read_global_record(arrays) is None:
            return []
        nodes = self._sample(grid, fraction, 1)
        self._eval_sampled = (server_round, frozenset(nodes))
        if self._current is not None:
            self._current.download_bytes += self._global_bytes(arrays) * len(nodes)
        return self._messages(server_round, arrays, nodes, MessageType.EVALUATE)

    def _admit_eval(self, msg: Message, node: int, intake: _Intake) -> EvalMetrics:
        """Check one evaluate reply; raise (any exception) to exclude it."""
        intake.admit_node(node)
        content = msg.content
        if KEY_METRICS not in content.metric_records:
            raise ReplyRejected("reply lacks the 'metrics' MetricRecord")
        name = self._name_of(node, content.config_records.get(KEY_CLIENT))
        intake.check_name(name)
        metrics = parse_eval_metrics(content.metric_records[KEY_METRICS], self.roster.cap_of(name))
        intake.names.add(name)
        return metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the valid replies' loss and accuracy, and their spread."""
        server_round += self.round_offset
        record = self._current or RoundRecord(round=server_round)
        intake = self._expected(self._eval_sampled, server_round)
        valid: list[EvalMetrics] = []
        for msg in replies:
            node = _src_node(msg)
            try:
                error = _error_of(msg)
                if error is not None:
                    raise ReplyRejected(error[1])
                valid.append(self._admit_eval(msg, node, intake))
            except Exception as exc:
                reason = _reason_of(exc)
                record.eval_excluded.append((node, reason))
                log(
                    WARNING,
                    "round %s: evaluation of node %s excluded: %s",
                    server_round,
                    node,
                    reason,
                )
        record.evaluated = len(valid)
        result = None
        if valid:
            weights = [m.num_examples for m in valid]
            record.federated_loss = _weighted_mean([m.loss for m in valid], weights)
            # An app with its own metric reports ``metric`` instead of ``accuracy``.
            acc = [(m.accuracy, m.num_examples) for m in valid if m.accuracy is not None]
            own = [(m.metric, m.num_examples) for m in valid if m.metric is not None]
            if acc:
                record.federated_accuracy = _weighted_mean([a for a, _ in acc], [w for _, w in acc])
            if own:
                record.federated_metric = _weighted_mean([v for v, _ in own], [w for _, w in own])
            record.federated_spread = evaluation_spread(valid, self.metric_higher_is_better)
            result = MetricRecord(
                {
                    k: v
                    for k, v in (
                        ("loss", record.federated_loss),
                        ("accuracy", record.federated_accuracy),
                        ("metric", record.federated_metric),
                    )
                    if v is not None
                }
            )
        record.evaluate_seconds = time.perf_counter() - self._t_eval
        self.history.append(record)
        self._current = None
        if self.on_round is not None:
            self.on_round(record)
        return result


def evaluation_spread(
    replies: Sequence[EvalMetrics], metric_higher_is_better: bool = True
) -> dict[str, Any] | None:
    """The spread across clients of the evaluate replies' accuracy (else own metric).

    Every reply counts once, whatever its example count. Replies with accuracy are
    summarized when any has it (higher is better); otherwise those with an app's own
    metric, whose direction ``metric_higher_is_better`` gives. ``None`` without either.
    """
    accuracies = [m.accuracy for m in replies if m.accuracy is not None]
    if accuracies:
        return client_spread(accuracies).to_dict()
    own = [m.metric for m in replies if m.metric is not None]
    if own:
        return client_spread(own, higher_is_better=metric_higher_is_better).to_dict()
    return None


# Polling of a masking stage's replies: every 10 ms at first, the interval growing by 5%
# of the time already waited, up to 0.5 s. Flower's send_and_receive polls every 0.1 s
# (simulation) or 3 s (deployment); a masking stage's replies come within tens of
# milliseconds in a simulation, so polling sooner keeps the extra exchanges cheap.
_POLL_FIRST, _POLL_GROWTH, _POLL_MOST = 0.01, 0.05, 0.5


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Send ``messages`` and collect their replies until all are in or ``timeout`` passes.

    What ``Grid.send_and_receive`` does, through the Grid's own ``push_messages`` and
    ``pull_messages``, with a poll interval that starts at 10 ms and grows slowly. A grid
    without them (a test double) gets ``send_and_receive``.
    """
    push = getattr(grid, "push_messages", None)
    pull = getattr(grid, "pull_messages", None)
    if push is None or pull is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(push(messages))
    start = time.monotonic()
    deadline = start + timeout
    replies: list[Message] = []
    while pending:
        got = list(pull(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        now = time.monotonic()
        if not pending or now >= deadline:
            break
        delay = min(_POLL_FIRST + _POLL_GROWTH * (now - start), _POLL_MOST)
        sleep(min(delay, deadline - now))
    return replies


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
