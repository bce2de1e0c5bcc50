"""The privacy math of a client: calibrating sigma and composing epsilon.

Kept apart from the bookkeeping (:mod:`sepals.client.privacy`). Two accountants:

* ``pld`` (the default) is Google ``dp-accounting``'s privacy-loss-distribution
  accountant (:func:`sepals.common.accounting.pld_epsilon`, pessimistic
  discretization, so every epsilon it reports is an upper bound). It is the tightest
  for DP-SGD's Poisson-subsampled Gaussian: the same sigma, q and steps that RDP reports
  as epsilon 8.00 compose to 7.32 under it. Sigma is found by bisection on PLD epsilons
  alone (:func:`_calibrate_pld`).
* ``rdp`` is Opacus's. Two things keep it cheap enough for a thousand clients a round:
  Opacus's RDP of the subsampled Gaussian is linear in the steps, so the per-step RDP
  of each ``(q, sigma)`` is computed once per process and scaled (the epsilon is the
  one Opacus's ``RDPAccountant`` reports, to the bit); and sigma is searched over the
  *integer* orders among Opacus's default orders, whose RDP has a closed form (about
  20x faster than the fractional orders' series). They are a subset of the orders the
  reported epsilon minimises over, so that sigma meets the budget over all orders too;
  a few checked steps then lower it to within Opacus's 0.01 tolerance of the target
  (each candidate is checked over the orders near the best one, a subset, so a
  candidate that passes is within budget over all orders).

Each accountant gives two epsilons (docs/privacy.md#neighbouring-relations): for
*zero-out* neighbours (:func:`compute_epsilon`, enforced), which has the numbers of
add/remove-one, and for *replace-one* neighbours (:func:`replace_one_epsilon_of`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np

from sepals.common.accounting import pld_epsilon
from sepals.common.config import PrivacyConfig
from sepals.common.explain_spec import ExplanationSpec

HistoryEntry = tuple[float, float, int]

#: Calibration stops once the planned epsilon is within this of the target (Opacus's
#: ``get_noise_multiplier`` default).
EPSILON_TOLERANCE = 0.01
#: Value discretization of the PLD accountant: pessimistic, so a coarser grid only
#: loosens the bound (by about 0.007 at epsilon 8 against 3e-3), at half the cost.
PLD_DISCRETIZATION = 1e-2
_REFINE_STEPS = 3


def _rdp_orders() -> list[float]:
    from opacus.accountants import RDPAccountant

    return [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]


def calibration_orders() -> list[float]:
    """The integer orders among Opacus's default RDP orders (2-10 and 12-63)."""
    return [a for a in _rdp_orders() if a.is_integer()]


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, sigma: float) -> tuple[float, ...]:
    """Opacus's RDP of one subsampled-Gaussian step at each default order (memoised)."""
    from opacus.accountants.analysis import rdp

    per_step = rdp.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=_rdp_orders())
    return tuple(float(v) for v in np.asarray(per_step))


def _rdp_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """What Opacus's ``RDPAccountant.get_epsilon`` returns, from memoised per-step RDP.

    ``compute_rdp`` returns the per-step vector times the steps, and the accountant sums
    one such vector per history entry; this does the same arithmetic in the same order.
    """
    from opacus.accountants.analysis import rdp

    total = sum(np.asarray(_rdp_per_step(q, s)) * n for s, q, n in history)
    eps, _ = rdp.get_privacy_spent(orders=_rdp_orders(), rdp=total, delta=delta)
    return float(eps)


def compute_epsilon(accountant: str, history: tuple[HistoryEntry, ...], delta: float) -> float:
    """Epsilon that ``accountant`` composes over ``history`` at ``delta`` (zero-out neighbours)."""
    if not history:
        return 0.0
    entries = tuple((float(s), float(q), int(n)) for s, q, n in history)
    return _epsilon_of(accountant, entries, float(delta))


@functools.lru_cache(maxsize=4096)
def _epsilon_of(
    accountant: str, entries: tuple[tuple[float, float, int], ...], delta: float
) -> float:
    """:func:`compute_epsilon` on normalised entries, memoised.

    A client checks its budget for the same history when it sets up masking and again
    when it trains.
    """
    with warnings.catch_warnings():
        # RDP warns when the best order is the largest one tried; the bound is then
        # merely loose (conservative), never wrong.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        if accountant == "rdp":
            return _rdp_epsilon(entries, delta)
        if accountant == "pld":
            if any(s <= 0.0 for s, _, n in entries if n):
                return math.inf  # a step without noise has no guarantee
            return pld_epsilon(entries, delta, replace_one=False, discretization=PLD_DISCRETIZATION)
    raise ValueError(f"accountant must be one of pld, rdp, got {accountant!r}")


def replace_one_epsilon_of(
    accountant: str, history: tuple[HistoryEntry, ...], delta: float
) -> float:
    """Epsilon of ``history`` at ``delta`` for replace-one neighbours, by ``accountant``.

    ``pld``: ``dp-accounting``'s PLD accountant with its replace-one relation, which it
    supports for Poisson-subsampled Gaussian steps. ``rdp``: neither Opacus's nor
    ``dp-accounting``'s RDP analysis of Poisson subsampling covers replace-one, so the
    bound is group privacy over two zero-out steps (remove the example, then add the
    other; see :func:`rdp_replace_one_epsilon`). A step without noise (sigma 0) has no
    guarantee: infinity.
    """
    entries = tuple((float(s), float(q), int(n)) for s, q, n in history if n)
    if not entries:
        return 0.0
    if any(s <= 0.0 for s, _, _ in entries):
        return math.inf
    return _replace_one_of(accountant, entries, float(delta))


@functools.lru_cache(maxsize=4096)
def _replace_one_of(
    accountant: str, entries: tuple[tuple[float, float, int], ...], delta: float
) -> float:
    if accountant == "pld":
        return pld_epsilon(entries, delta, replace_one=True, discretization=PLD_DISCRETIZATION)
    if accountant == "rdp":
        return rdp_replace_one_epsilon(entries, delta)
    raise ValueError(f"accountant must be one of pld, rdp, got {accountant!r}")


def rdp_replace_one_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """Replace-one epsilon at ``delta`` from the zero-out RDP of ``history``.

    Replacing example ``x`` by ``x'`` is two zero-out steps (``x`` by the null example,
    then the null example by ``x'``). Group privacy for (eps, delta)-DP (Dwork and Roth,
    "The Algorithmic Foundations of Differential Privacy", 2014, Theorem 2.2 and its
    (eps, delta) form): an (eps', delta')-DP mechanism is
    (2 eps', (1 + e^eps') delta')-DP for datasets two such steps apart. The delta'
    whose group delta is at most ``delta`` is found by bisection (in log space) on
    Opacus's RDP-to-(eps, delta) conversion, and the bound is ``2 eps'`` there.
    """
    from opacus.accountants.analysis import rdp

    total = sum(np.asarray(_rdp_per_step(q, s)) * n for s, q, n in history)

    def zero_out(d: float) -> float:
        eps, _ = rdp.get_privacy_spent(orders=_rdp_orders(), rdp=total, delta=d)
        return float(eps)

    def group_delta(d: float) -> float:
        return (1.0 + math.exp(min(zero_out(d), 700.0))) * d

    lo, hi = math.log(delta) - 60.0, math.log(delta)
    if group_delta(math.exp(lo)) > delta:
        return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2
        if group_delta(math.exp(mid)) <= delta:
            lo = mid
        else:
            hi = mid
    return 2.0 * zero_out(math.exp(lo))


@functools.lru_cache(maxsize=1024)
def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    reserve: tuple[HistoryEntry, ...] = (),
) -> float:
    """Smallest sigma (to Opacus's 0.01 epsilon tolerance) that keeps ``steps`` within budget.

    Opacus's ``get_noise_multiplier`` does the search. With the RDP accountant it
    searches over :func:`calibration_orders` (see the module docstring), whose sigma
    meets the target over all orders too, and a few checked steps then lower it toward
    the all-orders answer (:func:`_refine_rdp_sigma`): the epsilon
    :func:`compute_epsilon` reports for the result is never above ``target_epsilon``
    and usually within 0.01 of it. Calibration is done once per client for its planned
    participation and memoised per process, never per round.

    ``reserve`` holds releases planned after training (a private explanation's
    ``(sigma_e, 1.0, 1)``): sigma is then the smallest (found by bisection, each
    candidate checked) whose steps composed with them stay within ``target_epsilon``.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
    if reserve:
        return _calibrate_with_reserve(
            target_epsilon, delta, sample_rate, steps, accountant, reserve
        )

    def search(**orders: Any) -> float:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=EPSILON_TOLERANCE,
                **orders,
            )
        )

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        if accountant == "pld":
            return _calibrate_pld(target_epsilon, delta, sample_rate, steps)
        if accountant != "rdp":
            return search()
        sigma = _refine_rdp_sigma(
            target_epsilon, delta, sample_rate, steps, search(alphas=calibration_orders())
        )
        spent = compute_epsilon(accountant, ((sigma, sample_rate, steps),), delta)
        if target_epsilon - spent > 2 * EPSILON_TOLERANCE:
            # Still loose (a regime the refinement does not reach): Opacus's own search
            # over all orders, slower but as tight as its tolerance.
            sigma = search()
    return float(sigma)


def _calibrate_with_reserve(
    target: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    reserve: tuple[HistoryEntry, ...],
) -> float:
    """Smallest sigma whose ``steps`` composed with ``reserve`` stay within ``target``.

    Raises:
        ValueError: ``reserve`` alone already spends the target.

    """

    def eps(sigma: float) -> float:
        return compute_epsilon(accountant, ((sigma, sample_rate, steps), *reserve), delta)

    alone = compute_epsilon(accountant, reserve, delta)
    if alone >= target:
        raise ValueError(
            f"the planned releases alone spend epsilon {alone:.3f}, the whole budget "
            f"{target:g}: nothing is left for training"
        )
    lo = calibrate_noise_multiplier(target, delta, sample_rate, steps, accountant)
    hi = lo * 1.25
    while eps(hi) > target:
        lo, hi = hi, hi * 1.5
    while target - eps(hi) > EPSILON_TOLERANCE and hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


@functools.lru_cache(maxsize=256)
def release_noise_multiplier(epsilon: float, delta: float, accountant: str) -> float:
    """Smallest sigma (to 1e-4 relative) of one Gaussian release costing at most ``epsilon``.

    The release of a sum whose examples each move it by at most the clipping norm ``C``,
    noised with std ``sigma * C``: the accountant entry ``(sigma, 1.0, 1)``. Every
    returned sigma was checked with ``accountant``.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be positive, got {epsilon!r}")

    def eps(sigma: float) -> float:
        return compute_epsilon(accountant, ((sigma, 1.0, 1),), delta)

    hi = 1.0
    while eps(hi) > epsilon:
        hi *= 2.0
    lo = hi / 2.0
    while eps(lo) <= epsilon and lo > 1e-3:
        hi, lo = lo, lo / 2.0
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        if eps(mid) <= epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def release_reserve(
    spec: ExplanationSpec | None, privacy: PrivacyConfig
) -> tuple[HistoryEntry, ...]:
    """The accountant entries of a plan's explanation releases, for this client's budget."""
    if spec is None or not privacy.enabled:
        return ()
    sigma = release_noise_multiplier(spec.epsilon, privacy.delta, privacy.accountant)
    return ((sigma, 1.0, spec.releases),)


def _calibrate_pld(target: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest sigma whose PLD epsilon is within :data:`EPSILON_TOLERANCE` below ``target``.

    A geometric bracket from sigma 1, then bisection between a sigma that overspends and
    one that does not; PLD alone, so a client that composes with PLD never loads the RDP
    analysis. Every returned sigma was checked: its PLD epsilon is at most ``target``.
    """

    def eps(sigma: float) -> float:
        return compute_epsilon("pld", ((sigma, sample_rate, steps),), delta)

    hi = 1.0
    while eps(hi) > target:
        hi *= 1.5
    lo = hi / 1.5
    while eps(lo) <= target:
        hi, lo = lo, lo / 1.5
    while target - eps(hi) > EPSILON_TOLERANCE and hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _rdp_epsilon_over(
    orders: list[float], sigma: float, sample_rate: float, steps: int, delta: float
) -> tuple[float, float]:
    """Opacus's epsilon and best order for one schedule, minimised over ``orders`` only.

    Over a subset of the default orders this is an upper bound on the reported epsilon.
    """
    from opacus.accountants.analysis import rdp

    values = rdp.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=orders)
    eps, best = rdp.get_privacy_spent(orders=orders, rdp=values, delta=delta)
    return float(eps), float(best)


def _refine_rdp_sigma(
    target: float, delta: float, sample_rate: float, steps: int, sigma: float
) -> float:
    """Lower an integer-order sigma toward the all-orders one, checking every candidate.

    ``sigma`` meets ``target`` over the integer orders. Candidates are checked over the
    default orders within 1.5 of its best integer order: a subset, so a candidate that
    meets the target there meets it over all orders (and the reported epsilon is lower
    still), at a fifth of the cost of all orders. Each step guesses a smaller sigma
    from a local power law ``eps ~ sigma**-k`` fitted to the last two points (bisecting
    once a guess that overspends brackets the answer). At most :data:`_REFINE_STEPS`
    candidates.
    """
    integer = calibration_orders()
    _, best = _rdp_epsilon_over(integer, sigma, sample_rate, steps, delta)
    # At the smallest integer order the best order may lie below it: look down too.
    window = [
        a for a in _rdp_orders() if abs(a - best) <= 1.5 or (best <= min(integer) and a < best)
    ]
    aim = target - EPSILON_TOLERANCE / 2
    hi, eps_hi = sigma, _rdp_epsilon_over(window, sigma, sample_rate, steps, delta)[0]
    lo = 0.0
    slope = 1.5
    for _ in range(_REFINE_STEPS):
        if target - eps_hi <= EPSILON_TOLERANCE or eps_hi <= 0.0:
            break
        guess = hi * (eps_hi / aim) ** (1.0 / slope)
        if not lo < guess < hi:
            guess = (lo + hi) / 2
        eps = _rdp_epsilon_over(window, guess, sample_rate, steps, delta)[0]
        if eps > eps_hi:
            slope = max(math.log(eps / eps_hi) / math.log(hi / guess), 0.1)
        if eps <= target:
            hi, eps_hi = guess, eps
        else:
            lo = guess
    return hi
