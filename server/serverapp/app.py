"""The sepals ServerApp.

:func:`make_server_app` builds a Flower ``ServerApp`` that runs
:class:`~sepals.server.serverapp.strategy.EncryptedFedAvg`. The server receives only the public
HE context (a secret one is refused) and never holds a plaintext model: the initial
model is built by every client from a shared seed, and every later global model is a
ciphertext sum.

The strategy that :func:`build_strategy` returns recognises replies from a stock Flower
ClientApp and excludes them with one clear reason (a protocol mismatch) instead of a
traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import DEBUG, ERROR, INFO
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from sepals.common.codec import UpdateCodec
from sepals.common.errors import SecretKeyExposureError, SepalsError
from sepals.common.federation import FederationConfig
from sepals.common.log import log
from sepals.common.protocol import KEY_CLIENT, KEY_METRICS, KEY_UPDATE
from sepals.server.serverapp.roster import NodeRoster
from sepals.server.serverapp.strategy import (
    EncryptedFedAvg,
    ExplanationRecord,
    NodeOrder,
    RoundRecord,
    RoundSigner,
)

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]

# Flower's error code for a reply whose ClientApp raised (flwr.common.constant.ErrorCode).
_CLIENT_APP_RAISED = 2
# Records that a stock Flower app reads or writes and a sepals party never does.
_STOCK_RECORDS = ("arrays", "config")
MISMATCH_NOTE = "protocol mismatch: not a sepals client"


@dataclass(frozen=True)
class ServerSettings:
    """What the server needs to run a federation.

    Attributes:
        federation: Rounds, sampling and local-training settings.
        codec: The server's codec, from
            :func:`~sepals.common.scheme.make_server_codec` (which refuses a secret HE
            context); a plain codec runs plain FedAvg.
        vector_length: Number of model parameters.
        on_round: Sink for each round's :class:`RoundRecord`.
        evaluate_fn: Optional evaluation hook, called with the (encrypted) global model
            after every round; it runs wherever its key is, never in this process's
            strategy.
        roster: Who the nodes are and how many examples each may claim (see
            :class:`~sepals.server.serverapp.roster.NodeRoster`).
        min_available_nodes: Nodes to wait for before sampling (default: the
            federation's ``min_train_clients``).
        node_order: Stable sampling keys of the nodes (a simulation passes
            :func:`~sepals.server.serverapp.strategy.simulation_node_order`).
        metric_higher_is_better: Direction of an app's own metric.
        round_signer: Signs every round config with the operator's key.
        node_wait_timeout: Seconds to wait for ``min_available_nodes`` before sampling.
        round_offset: Rounds already done before this run (a resumed federation).
        on_explanation: Sink for the explanation round's record, when the federation
            has one (it runs after the last training round).

    """

    federation: FederationConfig
    codec: UpdateCodec
    vector_length: int = 0
    on_round: Callable[[RoundRecord], None] | None = None
    evaluate_fn: EvaluateFn | None = None
    roster: NodeRoster | None = None
    min_available_nodes: int | None = None
    node_order: NodeOrder | None = None
    metric_higher_is_better: bool = True
    round_signer: RoundSigner | None = None
    node_wait_timeout: float = 300.0
    round_offset: int = 0
    on_explanation: Callable[[ExplanationRecord], None] | None = None


class NoRoundAggregatedError(SepalsError):
    """A run ended without any round adding an update: nothing was trained."""


def protocol_mismatch(msg: Message) -> str | None:
    """Why ``msg`` comes from a stock Flower ClientApp rather than a sepals one, or ``None``.

    Two signs, each of which a sepals client never shows (it turns every failure into
    an error reply of its own): an error reply saying that the ClientApp raised on a
    stock Flower record name (``'arrays'`` or ``'config'``: a ``KeyError`` from looking
    for Flower's records in a sepals message), and a normal reply
    that lacks the sepals ``update`` record but carries an ArrayRecord under another
    name (Flower's ``arrays``). Anything else is left to the strategy's own checks.
    """
    try:
        if msg.has_error():
            code = msg.error.code
            reason = str(msg.error.reason or "")
            # Flower's reason quotes only str(exc), which for KeyError('arrays') is "'arrays'".
            if code == _CLIENT_APP_RAISED:
                for key in _STOCK_RECORDS:
                    if f"'{key}'" in reason or f'"{key}"' in reason:
                        return (
                            f"{MISMATCH_NOTE}: its ClientApp looked for Flower's '{key}' "
                            "record, which a sepals message does not carry"
                        )
            return None
        content = msg.content
        if KEY_UPDATE in content.array_records or KEY_CLIENT in content.config_records:
            return None
        others = sorted(str(k) for k in content.array_records)
        if others:
            return (
                f"{MISMATCH_NOTE}: reply lacks the sepals '{KEY_UPDATE}' record "
                f"(it carries ArrayRecord '{others[0]}')"
            )
        if KEY_METRICS not in content.metric_records and len(content) > 0:
            return f"{MISMATCH_NOTE}: reply carries none of the sepals records"
    except Exception:
        return None
    return None


def _node_of(msg: Message) -> int:
    try:
        node = msg.metadata.src_node_id
        return node if isinstance(node, int) and not isinstance(node, bool) else -1
    except Exception:
        return -1


class SepalsFedAvg(EncryptedFedAvg):
    """:class:`EncryptedFedAvg` that names a stock Flower ClientApp a protocol mismatch.

    A reply that :func:`protocol_mismatch` recognises is excluded before the
    strategy's checks, with that one reason; it is logged once per node at ``ERROR``
    (later rounds record it in the round's ``excluded`` without logging again).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mismatched_nodes: dict[int, str] = {}

    def _split(self, replies: Iterable[Message]) -> tuple[list[Message], list[tuple[int, str]]]:
        keep: list[Message] = []
        mismatched: list[tuple[int, str]] = []
        for msg in replies:
            reason = protocol_mismatch(msg)
            if reason is None:
                keep.append(msg)
                continue
            node = _node_of(msg)
            mismatched.append((node, reason))
            if node not in self.mismatched_nodes:
                self.mismatched_nodes[node] = reason
                log(ERROR, "node %s is excluded: %s", node, reason)
            else:
                log(DEBUG, "node %s: %s", node, reason)
        return keep, mismatched

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Exclude stock-Flower replies with a clear reason, then aggregate the rest."""
        keep, mismatched = self._split(replies)
        result = super().aggregate_train(server_round, keep)
        record = self.current_round
        if record is not None and mismatched:
            record.replied += len(mismatched)
            record.excluded.extend(mismatched)
        return result

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Exclude stock-Flower evaluation replies with a clear reason, then average."""
        keep, mismatched = self._split(replies)
        record = self.current_round
        if record is not None:
            record.eval_excluded.extend(mismatched)
        return super().aggregate_evaluate(server_round, keep)


def require_aggregation(strategy: EncryptedFedAvg) -> None:
    """Raise unless some round of ``strategy``'s run added at least one update.

    Raises:
        NoRoundAggregatedError: no round aggregated; the message says why the updates
            were missing (protocol mismatch, exclusions, declines or silence).

    """
    history = strategy.history
    if any(r.aggregated for r in history):
        return
    reasons: dict[str, int] = {}
    for record in history:
        for _node, reason in [*record.excluded, *record.declined]:
            reasons[reason] = reasons.get(reason, 0) + 1
    mismatched = strategy.mismatched_nodes if isinstance(strategy, SepalsFedAvg) else {}
    if mismatched:
        why = f"{len(mismatched)} node(s) are not sepals clients ({MISMATCH_NOTE})"
    elif reasons:
        top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        why = "replies excluded or declined: " + "; ".join(f"{r} (x{n})" for r, n in top)
    else:
        why = "no valid update arrived in any round"
    raise NoRoundAggregatedError(
        f"no round aggregated any update in {len(history)} round(s): {why}"
    )


def build_strategy(settings: ServerSettings) -> EncryptedFedAvg:
    """The strategy for ``settings``.

    It is a :class:`SepalsFedAvg`, so a stock Flower ClientApp's replies are excluded
    with a protocol-mismatch reason.

    Raises:
        SecretKeyExposureError: the codec holds a secret key, which the server never may.

    """
    if settings.codec.can_decrypt:
        raise SecretKeyExposureError(
            "the server's codec holds a secret HE key; give the server the public context only"
        )
    return SepalsFedAvg(
        codec=settings.codec,
        vector_length=settings.vector_length,
        federation=settings.federation,
        on_round=settings.on_round,
        roster=settings.roster,
        min_available_nodes=settings.min_available_nodes,
        node_order=settings.node_order,
        metric_higher_is_better=settings.metric_higher_is_better,
        round_signer=settings.round_signer,
        node_wait_timeout=settings.node_wait_timeout,
        round_offset=settings.round_offset,
    )


def make_server_app(settings: ServerSettings, strategy: EncryptedFedAvg | None = None) -> ServerApp:
    """A ``ServerApp`` that runs the encrypted federation described by ``settings``.

    Pass ``strategy`` (from :func:`build_strategy`) to keep a handle on its history.
    """
    # Build the strategy now, so a bad key or setting fails before any node connects.
    active = strategy if strategy is not None else build_strategy(settings)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        log(
            INFO,
            "sepals server: %s rounds, codec %s",
            settings.federation.rounds,
            active.codec.name,
        )
        active.start(
            grid=grid,
            initial_arrays=ArrayRecord(),
            num_rounds=settings.federation.rounds,
            timeout=settings.federation.round_timeout,
            evaluate_fn=settings.evaluate_fn,
        )
        explained = active.explain(grid)
        if explained is not None and settings.on_explanation is not None:
            settings.on_explanation(explained)

    return app
