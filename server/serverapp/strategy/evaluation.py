"""Federated evaluation: clients score the decrypted global model on their own test data."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid

from sepals.common.fairness import client_spread
from sepals.common.log import log
from sepals.common.protocol import (
    KEY_CLIENT,
    KEY_METRICS,
)
from sepals.common.records import read_global_record
from sepals.server.serverapp.replies import (
    EvalMetrics,
    ReplyRejected,
    parse_eval_metrics,
)
from sepals.server.serverapp.strategy.core import StrategyCore
from sepals.server.serverapp.strategy.intake import (
    Intake,
    error_of,
    reason_of,
    src_node,
    weighted_mean,
)
from sepals.server.serverapp.strategy.rounds import (
    RoundRecord,
)


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


class FederatedEvaluation(StrategyCore):
    """The evaluate phase: sampled clients score the decrypted global model locally."""

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

    def _admit_eval(self, msg: Message, node: int, intake: Intake) -> EvalMetrics:
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
            node = src_node(msg)
            try:
                error = error_of(msg)
                if error is not None:
                    raise ReplyRejected(error[1])
                valid.append(self._admit_eval(msg, node, intake))
            except Exception as exc:
                reason = reason_of(exc)
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
            record.federated_loss = weighted_mean([m.loss for m in valid], weights)
            # An app with its own metric reports ``metric`` instead of ``accuracy``.
            acc = [(m.accuracy, m.num_examples) for m in valid if m.accuracy is not None]
            own = [(m.metric, m.num_examples) for m in valid if m.metric is not None]
            if acc:
                record.federated_accuracy = weighted_mean([a for a, _ in acc], [w for _, w in acc])
            if own:
                record.federated_metric = weighted_mean([v for v, _ in own], [w for _, w in own])
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
