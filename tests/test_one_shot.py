"""The audit's one-shot epsilon estimate: Gaussian-DP conversion and cautious fitting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sepals.common.accounting import pld_epsilon
from sepals.simulations.audit import assess
from sepals.simulations.one_shot import gdp_delta, gdp_epsilon, one_shot_estimate


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0, 4.0])
def test_gdp_epsilon_is_the_gaussian_mechanisms(mu: float) -> None:
    # One Gaussian step of sensitivity 1 and noise 1/mu is mu-GDP; dp-accounting's PLD
    # (pessimistic, so a little above) is an independent implementation.
    eps = gdp_epsilon(mu, 1e-5)
    reference = pld_epsilon(((1.0 / mu, 1.0, 1),), 1e-5, replace_one=False, discretization=1e-3)
    assert eps == pytest.approx(reference, abs=0.02)
    assert gdp_delta(mu, eps) <= 1e-5 < gdp_delta(mu, eps * 0.99)


def test_gdp_epsilon_edges_and_errors() -> None:
    assert gdp_epsilon(0.0, 1e-5) == 0.0
    assert gdp_epsilon(math.inf, 1e-5) == math.inf
    values = [gdp_epsilon(mu, 1e-5) for mu in (0.1, 0.5, 1, 2, 5, 10)]
    assert values == sorted(values) and values[-1] > 50
    for mu, delta in ((-1.0, 1e-5), (math.nan, 1e-5), (1.0, 0.0), (1.0, 1.0)):
        with pytest.raises(ValueError):
            gdp_epsilon(mu, delta)


def test_estimate_is_cautious_but_close_for_gaussian_scores() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    scores = np.concatenate([rng.normal(1.5, 1.0, n), rng.normal(0.0, 1.0, n)])
    included = np.arange(2 * n) < n
    est = one_shot_estimate(scores, included, 1e-5, 0.95)
    truth = gdp_epsilon(1.5, 1e-5)
    assert 0.85 * truth < est.epsilon <= truth
    assert est.canaries_in == est.canaries_out == n and est.mu < 1.5


def test_same_distribution_rarely_gives_a_positive_estimate() -> None:
    # Included and left-out canaries alike: the fitted gap is noise, and its lower
    # confidence limit is 0 except at about the error level (2.5% for the gap).
    positive = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        scores = rng.normal(0.0, 1.0, 300)
        included = rng.random(300) < 0.5
        positive += one_shot_estimate(scores, included, 1e-5, 0.95).epsilon > 0
    assert positive <= 12  # expected about 5 of 200


def test_noiseless_separation_is_flagged_but_only_the_proven_bound_refutes() -> None:
    included = np.arange(100) < 50
    scores = np.where(included, 1.0, 0.0)
    assert one_shot_estimate(scores, included, 1e-5, 0.95).epsilon == math.inf
    result = assess(scores + np.linspace(0, 1e-3, 100), included, 1e-5, claimed_epsilon=8.0)
    assert result.one_shot_epsilon > 8.0 and result.estimate_exceeds_claim
    # The one-run bound alone cannot refute 8 with 100 canaries: the estimate is not a proof.
    assert result.epsilon_lower_bound < 8.0 and not result.refuted
    assert "CLAIM REFUTED" not in result.summary()
    assert "ESTIMATE exceeds the claim (an estimate, not a proof)" in result.summary()
    assert result.to_dict()["refuted"] is False
    low = assess(scores + np.linspace(0, 1e-3, 100), included, 1e-5, claimed_epsilon=1.0)
    assert low.epsilon_lower_bound > 1.0 and low.refuted and "CLAIM REFUTED" in low.summary()


def test_estimate_needs_canaries_on_both_sides() -> None:
    with pytest.raises(ValueError, match="needs >= 2 included"):
        one_shot_estimate(np.zeros(5), np.array([True, False, False, False, False]), 1e-5, 0.95)
    with pytest.raises(ValueError, match="confidence"):
        one_shot_estimate(np.zeros(4), np.array([True, True, False, False]), 1e-5, 1.0)
