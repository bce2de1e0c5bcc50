"""Encrypted federated averaging on Flower's Message API.

:class:`EncryptedFedAvg` is a Flower ``Strategy``: it reuses ``Strategy.start`` (the
round loop) and implements sampling, validation and aggregation itself, because the
server only ever holds ciphertexts. Each client sends its weighted change from the
round-0 model, ``a_i * (w_i - w_0)``, encrypted; the server adds the ciphertexts and
keeps ``sum(a_i)`` in the clear; clients decrypt the sum, divide and add ``w_0``. With
the plain codec the very same code runs FedAvg in the clear.

Modules: :mod:`~.core` (settings, sampling, signed messages), :mod:`~.masked_round`,
:mod:`~.evaluation`, :mod:`~.explain` (the private explanation round after training),
:mod:`~.fedavg` (training and the strategy itself), :mod:`~.intake` (reply admission),
:mod:`~.replay` (the accepted ciphertexts' keys), :mod:`~.rounds` (what is recorded),
:mod:`~.suspects` (who is behind rejected rounds), :mod:`~.verify` (clients check a
sum before it is adopted), :mod:`~.sampling` and :mod:`~.grid_io`.
"""

from sepals.server.serverapp.strategy.evaluation import evaluation_spread
from sepals.server.serverapp.strategy.explain import ExplanationRecord
from sepals.server.serverapp.strategy.fedavg import EncryptedFedAvg
from sepals.server.serverapp.strategy.grid_io import exchange
from sepals.server.serverapp.strategy.intake import codec_max_clients
from sepals.server.serverapp.strategy.replay import ReplayKeys
from sepals.server.serverapp.strategy.rounds import (
    ClientRoundReport,
    NodeOrder,
    RoundRecord,
    RoundSigner,
)
from sepals.server.serverapp.strategy.sampling import simulation_node_order

__all__ = [
    "ClientRoundReport",
    "EncryptedFedAvg",
    "ExplanationRecord",
    "NodeOrder",
    "ReplayKeys",
    "RoundRecord",
    "RoundSigner",
    "codec_max_clients",
    "evaluation_spread",
    "exchange",
    "simulation_node_order",
]
