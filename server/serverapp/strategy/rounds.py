"""What the server records about each round and each client's reply (plaintext metadata)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

DIGEST_BYTES = 32  # SHA-256 of a payload accepted by an older sepals (its checkpoints)


# Stable sampling keys: (grid, connected node ids) -> a key per node id.
NodeOrder = Callable[[Grid, Sequence[int]], Mapping[int, str]]


@dataclass(frozen=True)
class ClientRoundReport:
    """Plaintext metadata one client reported in one round (checked, never raw).

    ``client_id`` is the name the server's :class:`~sepals.server.serverapp.roster.NodeRoster`
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
    clamped_values: int = 0


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
    verify_accepts: int = 0
    verify_rejects: int = 0
    rejected: str | None = None
    clients: list[ClientRoundReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        out = {k: v for k, v in self.__dict__.items() if k != "clients"}
        out["clients"] = [c.__dict__ for c in self.clients]
        return out


# Adds the operator's fields (federation id, signature) to a round config before it is
# sent: ``(message_type, config, global_arrays) -> config``. See sepals.common.plan.
RoundSigner = Callable[[str, dict[str, Any], ArrayRecord], dict[str, Any]]
