from __future__ import annotations

import pytest

from sepals.client.privacy import compute_epsilon
from sepals.client.secret_random import DpRandomness
from sepals.common.accounting import pld_epsilon

# The default digits run: sigma, sample rate and steps of one client after 30 rounds.
HISTORY = ((1.4148, 1 / 9, 270),)


def replace_one_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    return pld_epsilon(history, delta, replace_one=True)


def test_replace_one_golden_value_and_ordering() -> None:
    # An independent check of sepals main (design brief, section 8) found 13.63 for this
    # history with dp-accounting's PLD accountant; Opacus RDP (add/remove) reports 8.00.
    eps = replace_one_epsilon(HISTORY, 1e-5)
    assert eps == pytest.approx(13.63, abs=0.02)
    assert eps > compute_epsilon("rdp", HISTORY, 1e-5) > 7.9
    fewer = replace_one_epsilon(((1.4148, 1 / 9, 90),), 1e-5)
    assert 0 < fewer < eps
    assert replace_one_epsilon((), 1e-5) == 0.0
    # Add/remove-one under PLD: 7.32 in the same independent check (9% below RDP).
    assert pld_epsilon(HISTORY, 1e-5, replace_one=False) == pytest.approx(7.32, abs=0.02)


def test_replace_one_composes_runs() -> None:
    split = ((1.4148, 1 / 9, 100), (1.4148, 1 / 9, 170))
    assert replace_one_epsilon(split, 1e-5) == pytest.approx(
        replace_one_epsilon(HISTORY, 1e-5), rel=1e-3
    )


@pytest.mark.parametrize("entry", [(0.0, 0.1, 10), (1.0, 0.0, 10), (1.0, 1.5, 10), (1.0, 0.1, -1)])
def test_replace_one_refuses_bad_history(entry: tuple[float, float, int]) -> None:
    with pytest.raises(ValueError, match="out of range"):
        replace_one_epsilon((entry,), 1e-5)


# ------------------------------------------------------------------ the pld accountant


@pytest.mark.parametrize(("target", "q", "steps"), [(8.0, 1 / 9, 270), (1.0, 1 / 9, 270)])
def test_pld_calibration_is_within_budget_and_tight(target: float, q: float, steps: int) -> None:
    from sepals.client.privacy import calibrate_noise_multiplier

    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, "pld")
    eps = compute_epsilon("pld", ((sigma, q, steps),), 1e-5)
    assert target - 0.01 <= eps <= target
    # The same sigma under RDP spends more: PLD buys less noise for the same budget.
    rdp_sigma = calibrate_noise_multiplier(target, 1e-5, q, steps, "rdp")
    assert sigma < 0.97 * rdp_sigma
    assert compute_epsilon("rdp", ((sigma, q, steps),), 1e-5) > target


def test_pld_ledger_composes_over_rounds_like_one_run() -> None:
    from dp_util import train_toy_rounds

    from sepals.client.training import TrainSettings
    from sepals.common.config import PrivacyConfig

    privacy = PrivacyConfig(target_epsilon=4.0, accountant="pld")
    settings = TrainSettings(batch_size=20, learning_rate=0.05, randomness=DpRandomness(1))
    ledger, q, steps = train_toy_rounds(privacy, settings, planned=3)
    assert ledger.accountant == "pld" and ledger.steps == 2 * steps
    assert ledger.epsilon == pytest.approx(
        pld_epsilon(
            ((ledger.noise_multiplier, q, 2 * steps),), 1e-5, replace_one=False, discretization=1e-2
        )
    )
    assert ledger.epsilon is not None and ledger.epsilon < 4.0
