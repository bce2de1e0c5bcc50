"""``noise_shares`` (``M``): a plan field that no longer splits any client's noise.

Splitting DP-SGD noise into shares has no proof for multi-step training, so every client
adds its whole noise whatever ``M`` is, and the epsilon it reports, enforces and prints
is its own update's. ``M > 1`` still needs masking with ``T >= M`` and is fixed by the
operator's signed plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_util import plain_plan
from torch.utils.data import TensorDataset

from sepals.client.core import ClientRuntime, SepalsClient
from sepals.client.privacy import PrivacyLedger
from sepals.common.accounting import pld_epsilon
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.federation import FederationConfig
from sepals.common.plan import FederationPlan, PlanViolationError
from sepals.common.protocol import RoundConfig
from sepals.common.round_signature import generate_operator_key
from sepals.simulations.cli import build_parser, config_from_args

MASKED = FederationConfig(rounds=3, mask_neighbours=9, mask_threshold=7)
SIGMA, CLIP = 1.3, 0.7


def _plan(fed: FederationConfig) -> FederationPlan:
    _, public = generate_operator_key()
    return FederationPlan.create(fed, "bfv-q2", "0" * 32, 10, public)


def _noise_client(shares: int) -> tuple[SepalsClient, RoundConfig, np.ndarray]:
    """A client whose gradients are all zero: one full-batch step moves it by noise only."""
    d, k, n = 500, 20, 50
    plan = dataclasses.replace(
        plain_plan(d * k),
        batch_size=n,
        local_epochs=1,
        learning_rate=1.0,
        momentum=0.0,
        lr_schedule="constant",
        noise_shares=shares,
        mask_neighbours=shares + 1 if shares > 1 else 0,
        mask_threshold=shares if shares > 1 else 0,
    )

    def factory() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Linear(d, k, bias=False)

    runtime = ClientRuntime(
        client_id="c",
        model_factory=factory,
        train_data=TensorDataset(torch.zeros(n, d), torch.zeros(n, dtype=torch.long)),
        test_data=None,
        privacy=PrivacyConfig(target_epsilon=1e6, max_grad_norm=CLIP, noise_multiplier=SIGMA),
        encryption=EncryptionConfig(scheme="none"),
        plan=plan,
    )
    client = SepalsClient(runtime)
    cfg = RoundConfig.for_plan(plan, 1)
    start = client.global_weights(cfg, None)
    return client, cfg, start


@pytest.mark.parametrize("shares", [1, 4])
def test_every_client_adds_its_whole_noise_whatever_m(shares: int) -> None:
    client, cfg, start = _noise_client(shares)
    ledger = PrivacyLedger.empty(client.runtime.privacy)
    settings, calibrated, _ = client._scheduled(cfg, ledger)
    from sepals.client.training import train_round

    out = train_round(
        client.factory,
        start,
        client.runtime.train_data,
        settings,
        client.runtime.privacy,
        calibrated,
        1,
    )
    moved = (out.weights - start) * 50  # expected batch size 50, learning rate 1
    rel = moved.std() / (SIGMA * CLIP)
    assert abs(rel - 1.0) < 0.05, rel  # 10,000 coordinates: ~0.7% standard error
    assert out.ledger.history == ((SIGMA, 1.0, 1),)


def test_with_m_above_one_the_enforced_epsilon_is_the_lone_updates() -> None:
    """The epsilon a client reports, enforces and prints is recomputed independently from
    the noise it actually added, its sample rate and its steps."""
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(60, 4, generator=gen), torch.randint(0, 2, (60,), generator=gen)
    )
    base = dataclasses.replace(plain_plan(10), rounds=3, batch_size=20)
    plans = {
        m: dataclasses.replace(
            base,
            noise_shares=m,
            mask_neighbours=2 if m > 1 else 0,
            mask_threshold=2 if m > 1 else 0,
        )
        for m in (1, 2)
    }
    sigmas = {}
    for m, plan in plans.items():
        runtime = ClientRuntime(
            client_id="c",
            model_factory=lambda: torch.nn.Linear(4, 2),
            train_data=data,
            test_data=None,
            privacy=PrivacyConfig(target_epsilon=3.0, delta=1e-3),
            encryption=EncryptionConfig(scheme="none"),
            plan=plan,
        )
        client = SepalsClient(runtime)
        ledger = PrivacyLedger.empty(runtime.privacy)
        for r in (1, 2):
            reply = client.train(RoundConfig.for_plan(plan, r), None, ledger)
            ledger = reply.ledger
        sigma, q, steps = ledger.history[0]
        lone = pld_epsilon(((sigma, q, steps),), 1e-3, replace_one=False, discretization=1e-2)
        assert reply.metrics["epsilon"] == pytest.approx(lone, rel=1e-9)
        assert reply.metrics["noise-multiplier"] == sigma and len(ledger.history) == 1
        assert "quant-error" in reply.metrics  # each update is private on its own
        sigmas[m] = sigma
    assert sigmas[2] == sigmas[1]  # M buys no smaller noise


def test_split_noise_needs_masking_with_threshold_at_least_m() -> None:
    assert replace(MASKED, noise_shares=7).noise_shares == 7
    with pytest.raises(ValueError, match="masking is off"):
        FederationConfig(noise_shares=2)
    with pytest.raises(ValueError, match="threshold of at least 8"):
        replace(MASKED, noise_shares=8)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="noise_shares must be an integer"):
            replace(MASKED, noise_shares=bad)  # type: ignore[arg-type]


def test_the_plan_carries_m_and_old_plans_mean_one() -> None:
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
    plan = _plan(replace(MASKED, noise_shares=5))
    record = RoundConfig.for_plan(plan, 1).to_record_dict()
    assert RoundConfig.admitted(plan, record).noise_shares == 5
    for value in (1, 7, 5.0):
        with pytest.raises(PlanViolationError, match="plan mismatch: noise-shares"):
            RoundConfig.admitted(plan, record | {"noise-shares": value})


def test_sepals_sim_flag() -> None:
    cfg = config_from_args(build_parser().parse_args(["--noise-shares", "5"]))
    assert cfg.federation.noise_shares == 5 and cfg.federation.mask_threshold >= 5
    plain = config_from_args(build_parser().parse_args([]))
    assert cfg.federation.learning_rate == plain.federation.learning_rate
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


def test_the_docs_say_what_m_buys() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "privacy.md").read_text()
    section = doc.split("## Distributed noise", 1)[1].split("\n## ", 1)[0]
    assert "lowers no client's noise" in section
