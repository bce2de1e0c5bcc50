"""The sepals ServerApp.

:func:`make_server_app` builds a Flower ``ServerApp`` that runs
:class:`~sepals.server.strategy.EncryptedFedAvg`. The server receives only the public
HE context (a secret one is refused) and never holds a plaintext model: the initial
model is built by every client from a shared seed, and every later global model is a
ciphertext sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from sepals.common.codec import make_server_codec
from sepals.common.config import EncryptionConfig, FederationConfig
from sepals.common.log import log
from sepals.server.roster import NodeRoster
from sepals.server.strategy import EncryptedFedAvg, RoundRecord

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass(frozen=True)
class ServerSettings:
    """What the server needs to run a federation.

    Attributes:
        federation: Rounds, sampling and local-training settings.
        encryption: Encryption settings (``scheme="none"`` runs plain FedAvg).
        public_context: Serialized public TenSEAL context (``None`` without encryption).
        vector_length: Number of model parameters.
        on_round: Sink for each round's :class:`RoundRecord`.
        evaluate_fn: Optional evaluation hook, called with the (encrypted) global model
            after every round; it runs wherever its key is, never in this process's
            strategy.
        roster: Who the nodes are and how many examples each may claim (see
            :class:`~sepals.server.roster.NodeRoster`).

    """

    federation: FederationConfig
    encryption: EncryptionConfig
    public_context: bytes | None = field(default=None, repr=False)
    vector_length: int = 0
    on_round: Callable[[RoundRecord], None] | None = None
    evaluate_fn: EvaluateFn | None = None
    roster: NodeRoster | None = None


def build_strategy(settings: ServerSettings) -> EncryptedFedAvg:
    """The strategy for ``settings``; refuses a secret HE context."""
    codec = make_server_codec(settings.encryption, settings.public_context)
    return EncryptedFedAvg(
        codec=codec,
        vector_length=settings.vector_length,
        federation=settings.federation,
        on_round=settings.on_round,
        roster=settings.roster,
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

    return app
