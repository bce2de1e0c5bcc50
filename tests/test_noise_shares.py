"""Distributed DP noise (``noise_shares``): each client adds sigma/sqrt(m).

The ledger keeps composing epsilon for the whole sigma (what a sum of m clients
carries); the split is fixed by the operator's signed plan and refused without masking.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_util import train_toy_rounds
from torch import nn
from torch.utils.data import TensorDataset

from sepals.client.privacy import PrivacyLedger, compute_epsilon, poisson_schedule
from sepals.client.training import TrainSettings, train_round
from sepals.common.config import PrivacyConfig
from sepals.common.federation import FederationConfig
from sepals.common.models import get_flat
from sepals.common.plan import FederationPlan, PlanViolationError
from sepals.common.protocol import RoundConfig
from sepals.common.round_signature import generate_operator_key
from sepals.simulations.cli import build_parser, config_from_args

MASKED = FederationConfig(rounds=3, mask_neighbours=9, mask_threshold=7)


def _plan(fed: FederationConfig) -> FederationPlan:
    _, public = generate_operator_key()
    return FederationPlan.create(fed, "bfv-q2", "0" * 32, 10, public)


def _pure_noise_step(
    noise_fraction: float, sigma: float = 1.3, clip: float = 0.7, noise_seed: int = 2
) -> tuple[np.ndarray, PrivacyLedger]:
    """One DP-SGD step on zero gradients: the weights move by the client's noise only."""
    d, k, n = 500, 20, 50
    data = TensorDataset(torch.zeros(n, d), torch.zeros(n, dtype=torch.long))

    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(d, k, bias=False))

    privacy = PrivacyConfig(target_epsilon=1e6, max_grad_norm=clip, noise_multiplier=sigma)
    settings = TrainSettings(
        batch_size=n,
        learning_rate=1.0,
        momentum=0.0,
        data_seed=1,
        noise_seed=noise_seed,
        noise_fraction=noise_fraction,
    )
    q, steps = poisson_schedule(n, n, 1)
    ledger = PrivacyLedger.empty(privacy).calibrated(privacy, q, steps, 1)
    w0 = get_flat(factory())
    out = train_round(factory, w0, data, settings, privacy, ledger, 1)
    return (out.weights - w0) * n, out.ledger


@pytest.mark.parametrize("shares", [1, 4, 9])
def test_a_client_adds_sigma_over_sqrt_m(shares: int) -> None:
    sigma, clip = 1.3, 0.7
    delta, ledger = _pure_noise_step(1 / math.sqrt(shares), sigma, clip)
    rel = delta.std() / (sigma * clip / math.sqrt(shares))
    assert abs(rel - 1.0) < 0.05, rel  # 10,000 coordinates: ~0.7% standard error
    # The ledger records and composes the whole sigma, not the client's share of it.
    assert ledger.history == ((sigma, 1.0, 1),)
    assert ledger.epsilon == pytest.approx(compute_epsilon("rdp", ((sigma, 1.0, 1),), 1e-5))


def test_m_clients_noise_sums_to_sigma() -> None:
    """The sum of m clients' independent shares has the whole sigma*C of one client."""
    sigma, clip, shares = 1.3, 0.7, 4
    total = np.zeros(10_000)
    for client in range(shares):
        delta, _ = _pure_noise_step(1 / math.sqrt(shares), sigma, clip, noise_seed=10 + client)
        total += delta
    assert abs(total.std() / (sigma * clip) - 1.0) < 0.05
    # One client's share alone is half as large: a lone update is less protected.
    assert abs(delta.std() / (sigma * clip) - 0.5) < 0.025


def test_the_ledger_composes_the_whole_sigma_over_rounds() -> None:
    privacy = PrivacyConfig(target_epsilon=3.0)
    settings = TrainSettings(batch_size=20, data_seed=1, noise_seed=1, noise_fraction=0.5)
    ledger, q, steps = train_toy_rounds(privacy, settings, planned=2)
    assert ledger.history == ((ledger.noise_multiplier, q, 2 * steps),)
    assert ledger.epsilon is not None and 2.9 < ledger.epsilon <= 3.0


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, math.nan])
def test_noise_fraction_is_validated(fraction: float) -> None:
    with pytest.raises(ValueError, match="noise_fraction"):
        TrainSettings(noise_fraction=fraction)


def test_split_noise_needs_masking_with_threshold_at_least_m() -> None:
    assert replace(MASKED, noise_shares=7).noise_shares == 7
    with pytest.raises(ValueError, match="masking is off"):
        FederationConfig(noise_shares=2)
    with pytest.raises(ValueError, match="threshold of at least 8"):
        replace(MASKED, noise_shares=8)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="noise_shares must be an integer"):
            replace(MASKED, noise_shares=bad)  # type: ignore[arg-type]


def test_the_plan_carries_m_and_old_plans_mean_local_dp() -> None:
    plan = _plan(replace(MASKED, noise_shares=5))
    assert plan.noise_shares == 5
    assert FederationPlan.from_dict(plan.to_dict()) == plan
    old = plan.to_dict()
    del old["noise_shares"]
    assert FederationPlan.from_dict(old).noise_shares == 1
    bad = plan.to_dict() | {"noise_shares": 8}
    with pytest.raises(ValueError, match=r"plan\.noise_shares"):
        FederationPlan.from_dict(bad)


def test_a_round_config_cannot_change_m() -> None:
    """A server that asks for less noise per client than the plan is refused."""
    plan = _plan(replace(MASKED, noise_shares=5))
    record = RoundConfig.for_plan(plan, 1).to_record_dict()
    assert RoundConfig.admitted(plan, record).noise_shares == 5
    for value in (1, 7, 5.0):
        with pytest.raises(PlanViolationError, match="plan mismatch: noise-shares"):
            RoundConfig.admitted(plan, record | {"noise-shares": value})


def test_sepals_sim_flag() -> None:
    cfg = config_from_args(build_parser().parse_args(["--noise-shares", "5"]))
    assert cfg.federation.noise_shares == 5 and cfg.federation.mask_threshold >= 5
    for argv, match in [
        (["--noise-shares", "3", "--no-masking"], "needs pairwise masking"),
        (["--noise-shares", "3", "--no-encryption"], "needs pairwise masking"),
        (["--noise-shares", "3", "--epsilon", "0"], "needs DP on"),
        (["--noise-shares", "8"], "threshold of at least 8"),
    ]:
        with pytest.raises(ValueError, match=match):
            config_from_args(build_parser().parse_args(argv))


def test_simulate_api_refuses_split_noise_without_masking(tmp_path: Path) -> None:
    from sepals.simulations import simulate

    app = str(Path(__file__).resolve().parents[1] / "examples" / "regression_app.py") + ":make_app"
    with pytest.raises(ValueError, match="needs BFV"):
        simulate(app, encryption="none", noise_shares=3, out=tmp_path)
    with pytest.raises(ValueError, match="threshold of at least 9"):
        simulate(app, clients=10, noise_shares=9, out=tmp_path)
