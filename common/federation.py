"""Federation settings: rounds, sampling, local training, masking and what evaluation discloses."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from sepals.common.explain_spec import ExplanationSpec


def sampled_per_round(clients: int, fraction: float, min_clients: int = 1) -> int:
    """Clients the strategy samples in one round of a federation of ``clients`` nodes.

    It is ``min(clients, max(min_clients, ceil(fraction * clients)))``, the rule of
    :class:`~sepals.server.serverapp.strategy.EncryptedFedAvg`. It is also the most updates one
    aggregate ever holds, so it is the right ``EncryptionConfig.max_clients``: a
    federation of 1,000 clients with ``fraction=0.1`` sums 100 updates per round.

    Raises:
        ValueError: ``clients < 1``, ``fraction`` outside ``(0, 1]`` or ``min_clients < 1``.

    """
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients must be an integer >= 1, got {clients!r}")
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    if isinstance(min_clients, bool) or not isinstance(min_clients, int) or min_clients < 1:
        raise ValueError(f"min_clients must be an integer >= 1, got {min_clients!r}")
    return min(clients, max(min_clients, math.ceil(fraction * clients)))


#: The default example count at which a client's FedAvg weight saturates.
DEFAULT_WEIGHT_CAP = 10_000


def check_weight_cap(weight_cap: object) -> None:
    """Raise ``ValueError`` unless ``weight_cap`` is an integer >= 1."""
    if isinstance(weight_cap, bool) or not isinstance(weight_cap, int) or weight_cap < 1:
        raise ValueError(f"weight_cap must be an integer >= 1, got {weight_cap!r}")


def update_weight(num_examples: int, weight_cap: int) -> float:
    """A client's FedAvg weight: ``min(num_examples, weight_cap) / weight_cap``, in (0, 1]."""
    return min(num_examples, weight_cap) / weight_cap


def check_noise_shares(noise_shares: object, mask_threshold: int) -> None:
    """Raise ``ValueError`` unless ``noise_shares`` is 1, or at most a masking threshold.

    Split noise (``m > 1``) is only sound when the server sees nothing but sums of at
    least ``m`` clients: pairwise masking with threshold ``T >= m``.
    """
    if isinstance(noise_shares, bool) or not isinstance(noise_shares, int) or noise_shares < 1:
        raise ValueError(f"noise_shares must be an integer >= 1, got {noise_shares!r}")
    if noise_shares > 1 and noise_shares > mask_threshold:
        raise ValueError(
            f"noise_shares {noise_shares} needs pairwise masking with a threshold of at least "
            f"{noise_shares} (the server must only see sums of that many clients), got "
            f"threshold {mask_threshold}" + (" (masking is off)" if mask_threshold == 0 else "")
        )


@dataclass(frozen=True)
class FederationConfig:
    """How the federation trains.

    Attributes:
        rounds: Number of federated rounds.
        fraction_train: Fraction of connected nodes sampled for training each round.
        min_train_clients: Minimum clients: nodes to wait for and sample at least, and
            valid updates a round needs before it changes the global model.
        fraction_evaluate: Fraction of nodes asked for federated evaluation each round.
        local_epochs: Epochs of local training per round.
        batch_size: (Expected) batch size; with DP it sets the Poisson sample rate.
        learning_rate: Local SGD learning rate (of round 1).
        lr_schedule: ``cosine`` decays the rate over the rounds to 10% of
            ``learning_rate`` in the last round, which damps the DP noise of the final
            rounds; ``constant`` keeps it.
        momentum: Local SGD momentum.
        round_timeout: Seconds the server waits for replies in one round (and in each
            masking stage of it).
        seed: Seed of node sampling and of the shared model initialisation.
        mask_neighbours: Pairwise masking under BFV (:mod:`sepals.common.masking`): each
            client's neighbour count ``k``; 0 turns masking off.
        mask_threshold: The Shamir threshold ``T`` of masking (0 when it is off).
        weight_cap: The example count at which a client's FedAvg weight saturates. A
            client with ``n`` examples weighs ``min(n, weight_cap) / weight_cap`` (at most
            1), so what it encodes does not grow with its dataset; FedAvg is exact for
            every client with at most ``weight_cap`` examples. Simulations set it to the
            largest client's count.
        noise_shares: ``m``, kept for plans that name it. Every client adds the whole
            DP-SGD noise whatever ``m`` is, so each update alone is (epsilon, delta)-DP
            with the epsilon it reports. ``m > 1`` only requires pairwise masking with
            ``m <= mask_threshold``: splitting the noise into shares has no proof for
            multi-step DP-SGD, so it lowers no client's noise
            (docs/privacy.md#distributed-noise).
        explanation: A private explanation round after the last training round
            (:class:`~sepals.common.explain_spec.ExplanationSpec`; a dict of its fields
            is accepted), or ``None`` (the default: none). Its epsilon comes out of each
            client's same total budget.

    """

    rounds: int = 30
    fraction_train: float = 1.0
    min_train_clients: int = 2
    fraction_evaluate: float = 0.0
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.1
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    momentum: float = 0.9
    round_timeout: float = 600.0
    seed: int = 0
    mask_neighbours: int = 0
    mask_threshold: int = 0
    noise_shares: int = 1
    weight_cap: int = DEFAULT_WEIGHT_CAP
    explanation: ExplanationSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "explanation", ExplanationSpec.from_value(self.explanation))
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        if self.fraction_train == 0.0:
            raise ValueError("fraction_train must be > 0: nobody would train")
        if self.min_train_clients < 1:
            raise ValueError(f"min_train_clients must be >= 1, got {self.min_train_clients}")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(
                f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if self.round_timeout <= 0:
            raise ValueError(f"round_timeout must be positive, got {self.round_timeout!r}")
        if (self.mask_neighbours == 0) != (self.mask_threshold == 0) or not (
            0 <= self.mask_threshold <= self.mask_neighbours
        ):
            raise ValueError(
                "mask_neighbours and mask_threshold must both be 0 (masking off) or satisfy "
                f"1 <= mask_threshold <= mask_neighbours, got {self.mask_neighbours} and "
                f"{self.mask_threshold}"
            )
        check_noise_shares(self.noise_shares, self.mask_threshold)
        check_weight_cap(self.weight_cap)

    @property
    def masking(self) -> bool:
        """Whether rounds use pairwise masks."""
        return self.mask_neighbours > 0

    @property
    def evaluation_disclosure(self) -> str:
        """What federated evaluation reveals to the server, in words (for logs and reports)."""
        if self.fraction_evaluate <= 0.0:
            return "off: no per-client metric reaches the server"
        return (
            f"on ({self.fraction_evaluate:g} of nodes a round): each evaluating node's loss, "
            "metric and example count reach the server in the clear, outside epsilon"
        )

    def learning_rate_at(self, server_round: int) -> float:
        """The local learning rate of ``server_round`` (from 1) under the schedule."""
        if self.lr_schedule == "constant" or self.rounds == 1:
            return self.learning_rate
        progress = (min(max(server_round, 1), self.rounds) - 1) / (self.rounds - 1)
        return self.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of every field."""
        return asdict(self)
