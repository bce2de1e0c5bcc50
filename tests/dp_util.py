"""Shared test helpers: a tiny DP-SGD client (60 examples of 4 features, a linear model)
and a plaintext federation plan."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from sepals.client.privacy import PrivacyLedger, poisson_schedule
from sepals.client.training import TrainSettings, train_round
from sepals.common.codec import PlainCodec
from sepals.common.config import PrivacyConfig
from sepals.common.federation import FederationConfig
from sepals.common.models import get_flat
from sepals.common.plan import FederationPlan
from sepals.common.round_signature import generate_operator_key

EXAMPLES = 60


def train_toy_rounds(
    privacy: PrivacyConfig, settings: TrainSettings, planned: int, rounds: int = 2
) -> tuple[PrivacyLedger, float, int]:
    """Train ``rounds`` rounds on the toy data; return the ledger, q and steps per round.

    Sigma is calibrated for ``planned`` rounds, as a client calibrates for its plan.
    """
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(EXAMPLES, 4, generator=gen), torch.randint(0, 2, (EXAMPLES,), generator=gen)
    )

    def factory() -> torch.nn.Module:
        return torch.nn.Linear(4, 2)

    q, steps = poisson_schedule(EXAMPLES, settings.batch_size, settings.epochs)
    ledger = PrivacyLedger.empty(privacy).calibrated(privacy, q, steps, planned)
    weights = get_flat(factory())
    for r in range(1, rounds + 1):
        out = train_round(factory, weights, data, settings, privacy, ledger, r)
        ledger, weights = out.ledger, out.weights
    return ledger, q, steps


def plain_plan(vector_length: int, checkpoint_sha256: str = "") -> FederationPlan:
    """A plan for plaintext updates of ``vector_length`` values, with a fresh operator key."""
    return FederationPlan.create(
        FederationConfig(),
        PlainCodec.name,
        PlainCodec().fingerprint_hex,
        vector_length,
        generate_operator_key()[1],
        checkpoint_sha256=checkpoint_sha256,
    )
