"""Encrypted federated averaging on Flower's Message API.

:class:`EncryptedFedAvg` is a Flower ``Strategy``: it reuses ``Strategy.start`` (the
round loop) and implements sampling, validation and aggregation itself, because the
server only ever holds ciphertexts. Each client sends ``n_i * w_i`` encrypted; the
server adds the ciphertexts and keeps ``sum(n_i)`` in the clear; clients decrypt the
sum and divide. With the plain codec the very same code runs FedAvg in the clear.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from time import sleep
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from sepals.common.codec import UpdateCodec
from sepals.common.config import FederationConfig
from sepals.common.errors import SepalsError
from sepals.common.log import log
from sepals.common.protocol import (
    ERR_BUDGET_EXHAUSTED,
    KEY_CLIENT,
    KEY_CONFIG,
    KEY_GLOBAL,
    KEY_METRICS,
    KEY_PAYLOAD,
    KEY_UPDATE,
    RoundConfig,
    global_record,
    payload_from_array,
    read_global_record,
)


@dataclass(frozen=True)
class ClientRoundReport:
    """Plaintext metadata one client reported in one round."""

    node_id: int
    client_id: str
    num_examples: int
    epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    total_steps: int
    rounds_participated: int
    accountant: str | None
    quant_error: float | None = None


@dataclass
class RoundRecord:
    """What the server observed in one round (all plaintext metadata)."""

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
    quant_error: float | None = None
    federated_loss: float | None = None
    federated_accuracy: float | None = None
    train_seconds: float = 0.0
    evaluate_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    clients: list[ClientRoundReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        out = {k: v for k, v in self.__dict__.items() if k != "clients"}
        out["clients"] = [c.__dict__ for c in self.clients]
        return out


# Adds the operator's fields (federation id, signature) to a round config before it is
# sent: ``(message_type, config, global_arrays) -> config``. See sepals.common.plan.
RoundSigner = Callable[[str, dict[str, Any], ArrayRecord], dict[str, Any]]


def _opt_float(metrics: MetricRecord, key: str) -> float | None:
    return float(metrics[key]) if key in metrics else None  # type: ignore[arg-type]


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

    A round changes the global model only if at least ``min_train_clients`` valid updates
    arrive before the round timeout. Sampled nodes that never reply (dropped, killed,
    partitioned) are counted as ``missing`` and the round goes on without them.

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
    ) -> None:
        if vector_length < 1:
            raise ValueError(f"vector_length must be >= 1, got {vector_length}")
        if round_offset < 0:
            raise ValueError(f"round_offset must be >= 0, got {round_offset}")
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

    @property
    def current_round(self) -> RoundRecord | None:
        """The record of the round in progress (``None`` between rounds)."""
        return self._current

    # ------------------------------------------------------------------ helpers
    def summary(self) -> None:
        """Log the strategy settings."""
        log(
            INFO,
            "EncryptedFedAvg: codec=%s key=%s params=%s rounds=%s fraction_train=%s",
            self.codec.name,
            self.codec.fingerprint_hex,
            self.vector_length,
            self.federation.rounds,
            self.federation.fraction_train,
        )

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Sample ``max(minimum, ceil(fraction * connected))`` of the connected nodes.

        Waits up to ``node_wait_timeout`` for ``min_available_nodes`` to connect. If even
        ``minimum`` nodes are not there by then, nobody is sampled: a round that cannot
        reach its minimum would only make clients spend privacy budget for nothing.
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
        k = min(len(nodes), max(minimum, math.ceil(fraction * len(nodes))))
        chosen = self.rng.choice(len(nodes), size=k, replace=False)
        return sorted(nodes[i] for i in chosen)

    def _messages(
        self, server_round: int, arrays: ArrayRecord, node_ids: list[int], message_type: str
    ) -> list[Message]:
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
        record = RecordDict({KEY_GLOBAL: arrays, KEY_CONFIG: ConfigRecord(config)})
        return [Message(record, dst_node_id=n, message_type=message_type) for n in node_ids]

    @staticmethod
    def _global_bytes(arrays: ArrayRecord) -> int:
        parsed = read_global_record(arrays)
        return 0 if parsed is None else len(parsed[0])

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the round config and the encrypted global model."""
        server_round += self.round_offset
        self._t_round = time.perf_counter()
        record = RoundRecord(round=server_round, codec=self.codec.name)
        self._current = record
        nodes = self._sample(
            grid, self.federation.fraction_train, self.federation.min_train_clients
        )
        record.sampled = len(nodes)
        record.download_bytes += self._global_bytes(arrays) * len(nodes)
        log(INFO, "round %s: training on %s nodes", server_round, len(nodes))
        return self._messages(server_round, arrays, nodes, MessageType.TRAIN)

    def _validate_reply(self, msg: Message) -> tuple[list[Any], int, ClientRoundReport]:
        content = msg.content
        if KEY_UPDATE not in content.array_records or KEY_METRICS not in content.metric_records:
            raise ValueError("reply lacks the 'update' ArrayRecord or the 'metrics' MetricRecord")
        update = content.array_records[KEY_UPDATE]
        if KEY_PAYLOAD not in update:
            raise ValueError("update record lacks 'payload'")
        payload = payload_from_array(update[KEY_PAYLOAD])
        metrics = content.metric_records[KEY_METRICS]
        n_raw = metrics.get("num-examples")
        if not isinstance(n_raw, int | float) or not math.isfinite(n_raw) or n_raw <= 0:
            raise ValueError(f"num-examples must be a positive number, got {n_raw!r}")
        loaded = self.codec.validate(payload, self.vector_length)
        client_rec = content.config_records.get(KEY_CLIENT)
        client_id = str(client_rec["client-id"]) if client_rec and "client-id" in client_rec else ""
        report = ClientRoundReport(
            node_id=msg.metadata.src_node_id,
            client_id=client_id or str(msg.metadata.src_node_id),
            num_examples=int(n_raw),
            epsilon=_opt_float(metrics, "epsilon"),
            delta=_opt_float(metrics, "delta"),
            noise_multiplier=_opt_float(metrics, "noise-multiplier"),
            sample_rate=_opt_float(metrics, "sample-rate"),
            total_steps=int(metrics.get("total-steps", 0)),  # type: ignore[arg-type]
            rounds_participated=int(metrics.get("rounds-participated", 0)),  # type: ignore[arg-type]
            accountant=(
                str(client_rec["accountant"]) if client_rec and "accountant" in client_rec else None
            ),
            quant_error=_opt_float(metrics, "quant-error"),
        )
        return loaded, len(payload), report

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, exclude bad ones with a logged reason, add the rest."""
        server_round += self.round_offset
        if self._current is None or self._current.round != server_round:
            self._current = RoundRecord(round=server_round, codec=self.codec.name)
        record = self._current
        loaded_all: list[list[Any]] = []
        weight_total = 0.0
        for msg in replies:
            record.replied += 1
            node = msg.metadata.src_node_id
            if msg.has_error():
                reason = msg.error.reason or f"error code {msg.error.code}"
                if msg.error.code == ERR_BUDGET_EXHAUSTED:
                    record.declined.append((node, reason))
                    log(INFO, "round %s: node %s declined: %s", server_round, node, reason)
                else:
                    record.excluded.append((node, reason))
                    log(WARNING, "round %s: node %s failed: %s", server_round, node, reason)
                continue
            try:
                loaded, nbytes, report = self._validate_reply(msg)
            except (SepalsError, ValueError, KeyError, TypeError) as exc:
                record.excluded.append((node, f"{type(exc).__name__}: {exc}"))
                log(WARNING, "round %s: excluding node %s: %s", server_round, node, exc)
                continue
            loaded_all.append(loaded)
            weight_total += report.num_examples
            record.upload_bytes += nbytes
            record.clients.append(report)
        record.accepted = len(loaded_all)
        eps = [c.epsilon for c in record.clients if c.epsilon is not None]
        record.max_epsilon = max(eps) if eps else None
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
        t0 = time.perf_counter()
        payload = self.codec.aggregate_loaded(loaded_all, self.vector_length)
        record.aggregate_seconds = time.perf_counter() - t0
        record.weight_total = weight_total
        record.aggregated = True
        self.latest_global = global_record(payload, weight_total)
        errors = [c.quant_error for c in record.clients]
        if errors and all(e is not None for e in errors):
            # Each client's rounding error is at most e_i on n_i * w_i, so the averaged
            # model is off by at most sum(e_i) / sum(n_i) in every coordinate.
            record.quant_error = sum(e for e in errors if e is not None) / weight_total
        log(
            INFO,
            "round %s: aggregated %s updates (%s declined, %s excluded)",
            server_round,
            record.accepted,
            len(record.declined),
            len(record.excluded),
        )
        return self.latest_global, self._train_metrics(record)

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
        if fraction <= 0.0 or read_global_record(arrays) is None:
            return []
        nodes = self._sample(grid, fraction, 1)
        if self._current is not None:
            self._current.download_bytes += self._global_bytes(arrays) * len(nodes)
        return self._messages(server_round, arrays, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the clients' loss and accuracy."""
        server_round += self.round_offset
        record = self._current or RoundRecord(round=server_round)
        total, loss, acc = 0.0, 0.0, 0.0
        for msg in replies:
            if msg.has_error() or KEY_METRICS not in msg.content.metric_records:
                continue
            m = msg.content.metric_records[KEY_METRICS]
            try:
                n = float(m["num-examples"])  # type: ignore[arg-type]
                lo, ac = float(m["loss"]), float(m["accuracy"])  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError):
                continue
            if n <= 0 or not (math.isfinite(lo) and math.isfinite(ac)):
                continue
            total += n
            loss += n * lo
            acc += n * ac
        result = None
        if total > 0:
            record.federated_loss, record.federated_accuracy = loss / total, acc / total
            result = MetricRecord(
                {"loss": record.federated_loss, "accuracy": record.federated_accuracy}
            )
        record.evaluate_seconds = time.perf_counter() - self._t_eval
        self.history.append(record)
        self._current = None
        if self.on_round is not None:
            self.on_round(record)
        return result
