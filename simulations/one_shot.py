"""The one-shot epsilon estimate of the privacy audit (Andrew et al., ICLR 2024).

Andrew, Kairouz, Oh, Oprea, McMahan and Suriyakumar, "One-shot Empirical Privacy
Estimation for Federated Learning", fit a Gaussian to the scores of the canaries that
took part in training and another to those of canaries that did not, and report the
epsilon of the Gaussian mechanism that tells those two Gaussians apart. Unlike the
one-run bound of :mod:`sepals.simulations.audit`, whose largest possible value grows
only with the logarithm of the number of guesses (about 3.7 for 300 canaries), this
estimate has no ceiling: a run whose canaries stand far out of the noise gets a large
epsilon, which can refute a claim of 8.

Here the estimate is made cautious in two ways, so that sampling error in the fit does
not inflate it:

* the gap between the two means is taken at its lower confidence limit
  (``gap - z * standard error``), and the spread at the upper confidence limit of the
  larger of the two standard deviations (chi-square), each at half the audit's error
  level (Bonferroni);
* both Gaussians get that one (largest) spread, so the estimate is the epsilon at
  ``delta`` of ``mu``-Gaussian DP with ``mu = gap_low / spread_high`` (Dong, Roth and
  Su, 2022: ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``).

It remains an estimate under the Gaussian shape of the scores, not a proven bound:
the report keeps it apart from the one-run bound and names both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

_BISECTION_STEPS = 60
#: Largest epsilon the estimate resolves; a larger one is reported as infinite.
EPSILON_CEILING = 500.0


def gdp_delta(mu: float, eps: float) -> float:
    """``delta(eps)`` of ``mu``-Gaussian DP (Dong, Roth and Su), computed in logs."""
    if mu <= 0.0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    first = float(stats.norm.cdf(-eps / mu + mu / 2))
    second = math.exp(eps + float(stats.norm.logcdf(-eps / mu - mu / 2)))
    return max(first - second, 0.0)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon with ``delta(eps) <= delta`` under ``mu``-Gaussian DP.

    Raises:
        ValueError: ``mu`` is negative or ``delta`` not in (0, 1).

    """
    if mu < 0.0 or math.isnan(mu):
        raise ValueError(f"mu must be >= 0, got {mu}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    if math.isinf(mu) or gdp_delta(mu, EPSILON_CEILING) > delta:
        return math.inf
    lo, hi = 0.0, EPSILON_CEILING
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if gdp_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class OneShotEstimate:
    """The one-shot estimate and the fit behind it (``report.json``'s ``audit.one_shot``)."""

    epsilon: float
    mu: float
    mean_in: float
    mean_out: float
    std_in: float
    std_out: float
    gap_low: float
    spread_high: float
    canaries_in: int
    canaries_out: int
    confidence: float
    method: str = (
        "Andrew et al. (ICLR 2024) one-shot estimate: Gaussians fitted to the scores of "
        "included and of left-out canaries; mu = (lower confidence limit of the mean gap) "
        "/ (upper confidence limit of the larger standard deviation), each at half the "
        "error level; epsilon of mu-Gaussian DP at delta. An estimate under the Gaussian "
        "shape of the scores, not a proven bound."
    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (an infinite epsilon or mu stays ``Infinity``)."""
        return asdict(self)


def one_shot_estimate(
    scores: npt.NDArray[np.floating],  # type: ignore[type-arg]
    included: npt.NDArray[np.bool_],
    delta: float,
    confidence: float,
) -> OneShotEstimate:
    """The one-shot epsilon of canaries with ``scores`` (``included``: which took part).

    Raises:
        ValueError: fewer than two canaries on either side, or ``confidence`` not in
            (0, 1).

    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    values = np.asarray(scores, dtype=np.float64)
    mask = np.asarray(included, dtype=bool)
    inside, outside = values[mask], values[~mask]
    if len(inside) < 2 or len(outside) < 2:
        raise ValueError(
            f"the one-shot estimate needs >= 2 included and >= 2 left-out canaries, got "
            f"{len(inside)} and {len(outside)}"
        )
    level = (1.0 - confidence) / 2  # Bonferroni over the gap and the spread
    mean_in, mean_out = float(inside.mean()), float(outside.mean())
    std_in, std_out = float(inside.std(ddof=1)), float(outside.std(ddof=1))
    se = math.sqrt(std_in**2 / len(inside) + std_out**2 / len(outside))
    gap_low = max(mean_in - mean_out - float(stats.norm.ppf(1.0 - level)) * se, 0.0)
    n_wide = len(inside) if std_in >= std_out else len(outside)
    wide = max(std_in, std_out)
    spread_high = wide * math.sqrt((n_wide - 1) / float(stats.chi2.ppf(level, n_wide - 1)))
    if gap_low == 0.0:
        mu = 0.0
    elif spread_high == 0.0:
        mu = math.inf
    else:
        mu = gap_low / spread_high
    return OneShotEstimate(
        epsilon=gdp_epsilon(mu, delta),
        mu=mu,
        mean_in=mean_in,
        mean_out=mean_out,
        std_in=std_in,
        std_out=std_out,
        gap_low=gap_low,
        spread_high=spread_high,
        canaries_in=len(inside),
        canaries_out=len(outside),
        confidence=confidence,
    )
