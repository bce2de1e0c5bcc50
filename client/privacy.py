"""A client's privacy bookkeeping, kept apart from the privacy math.

:class:`PrivacyLedger` is the persistent record: the Opacus accountant history (one
``(noise_multiplier, sample_rate, steps)`` entry per run of identical steps), the rounds
the client joined, and the resulting epsilon. It is a frozen value: each round yields a
new ledger, which the client stores *before* it sends its update.

The math (calibrating sigma, composing epsilon) is delegated to Opacus's accountants in
:func:`calibrate_noise_multiplier` and :func:`compute_epsilon`. For the default RDP
accountant two things keep it cheap enough for a thousand clients a round:

* Opacus's RDP of the subsampled Gaussian is linear in the steps, so the per-step RDP
  of each ``(q, sigma)`` is computed once per process and scaled; the epsilon is the one
  Opacus's ``RDPAccountant`` reports, to the bit.
* Sigma is searched over the *integer* orders among Opacus's default orders, whose
  RDP has a closed form (about 20x faster than the fractional orders' series). They are
  a subset of the orders the reported epsilon minimises over, so that sigma meets the
  budget over all orders too; a few checked steps then lower it to within Opacus's 0.01
  tolerance of the target (each candidate is checked over the orders near the best
  one, a subset, so a candidate that passes is within budget over all orders).

The ``pld`` accountant is Google ``dp-accounting``'s privacy-loss-distribution
accountant (:func:`sepals.common.accounting.pld_epsilon`, add/remove-one neighbours,
pessimistic discretization, so every epsilon it reports is an upper bound). It is the
tightest for DP-SGD's Poisson-subsampled Gaussian: the same sigma, q and steps that RDP
reports as epsilon 8.00 compose to 7.32 under it. Opacus does not know it, so Opacus
keeps the history (with its RDP accountant, whose history is the same list of
``(sigma, q, steps)``) and the epsilon is composed here; sigma is found by bisection
(:func:`_calibrate_pld`).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from sepals.common.accounting import pld_epsilon
from sepals.common.config import PrivacyConfig
from sepals.common.errors import BudgetExhaustedError
from sepals.common.ledger import LedgerFileError, read_ledger_file, write_ledger_file

HistoryEntry = tuple[float, float, int]

#: Calibration stops once the planned epsilon is within this of the target (Opacus's
#: ``get_noise_multiplier`` default).
EPSILON_TOLERANCE = 0.01
#: Value discretization of the PLD accountant: pessimistic, so a coarser grid only
#: loosens the bound (by about 0.007 at epsilon 8 against 3e-3), at half the cost.
PLD_DISCRETIZATION = 1e-2
_REFINE_STEPS = 3

# A projected epsilon may exceed the target by this relative slack before a round is
# refused; it absorbs float noise in the accountants, never a real overspend.
_EPS_SLACK = 1e-9


def _make_accountant(name: str) -> Any:
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=name)


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
    """Epsilon that Opacus's ``accountant`` composes over ``history`` at ``delta``."""
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
            return pld_epsilon(entries, delta, replace_one=False, discretization=PLD_DISCRETIZATION)
        acc = _make_accountant(accountant)
        acc.history = list(entries)
        return float(acc.get_epsilon(delta=delta))


def replace_one_epsilon_of(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """Epsilon of ``history`` at ``delta`` for replace-one neighbours (PLD, pessimistic).

    A step without noise (sigma 0) has no guarantee: infinity.
    """
    entries = tuple((float(s), float(q), int(n)) for s, q, n in history if n)
    if not entries:
        return 0.0
    if any(s <= 0.0 for s, _, _ in entries):
        return math.inf
    return _replace_one_of(entries, float(delta))


@functools.lru_cache(maxsize=4096)
def _replace_one_of(entries: tuple[tuple[float, float, int], ...], delta: float) -> float:
    return pld_epsilon(entries, delta, replace_one=True, discretization=PLD_DISCRETIZATION)


@functools.lru_cache(maxsize=1024)
def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Smallest sigma (to Opacus's 0.01 epsilon tolerance) that keeps ``steps`` within budget.

    Opacus's ``get_noise_multiplier`` does the search. With the RDP accountant it
    searches over :func:`calibration_orders` (see the module docstring), whose sigma
    meets the target over all orders too, and a few checked steps then lower it toward
    the all-orders answer (:func:`_refine_rdp_sigma`): the epsilon
    :func:`compute_epsilon` reports for the result is never above ``target_epsilon``
    and usually within 0.01 of it. Calibration is done once per client for its planned
    participation and memoised per process, never per round.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")

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


def _calibrate_pld(target: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest sigma whose PLD epsilon is within :data:`EPSILON_TOLERANCE` below ``target``.

    Bisection between a sigma that overspends and one that does not, starting from the
    RDP calibration (PLD is tighter, so its epsilon there is usually below the target).
    Every returned sigma was checked: its PLD epsilon is at most ``target``.
    """

    def eps(sigma: float) -> float:
        return compute_epsilon("pld", ((sigma, sample_rate, steps),), delta)

    hi = calibrate_noise_multiplier(target, delta, sample_rate, steps, "rdp")
    while eps(hi) > target:
        hi *= 1.25
    lo = hi * 0.8
    while eps(lo) <= target:
        hi, lo = lo, lo * 0.8
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


def planned_participation(rounds: int, fraction: float) -> int:
    """Rounds a client plans to join: the mean plus two standard deviations, capped.

    With sampling fraction ``f`` over ``R`` rounds, participation is Binomial(R, f).
    Planning for mean + 2 sd makes an early budget exhaustion unlikely while keeping
    sigma close to what the expected participation needs; the budget is still
    enforced round by round.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    mean = rounds * fraction
    sd = math.sqrt(rounds * fraction * (1.0 - fraction))
    return max(1, min(rounds, math.ceil(mean + 2.0 * sd)))


def poisson_schedule(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Sample rate and steps per round of Opacus's Poisson loader.

    Opacus turns a loader of ``L = ceil(n / B)`` batches into ``L`` Poisson batches per
    epoch with sample rate ``1 / L``.
    """
    if num_examples < 1:
        raise ValueError("a client needs at least one training example")
    batches = math.ceil(num_examples / batch_size)
    return 1.0 / batches, batches * epochs


@dataclass(frozen=True)
class PrivacyLedger:
    """What one client has spent, composed over all its rounds.

    Attributes:
        accountant: Opacus accountant name.
        delta: Delta of the reported guarantee.
        target_epsilon: The budget; ``None`` when DP is off.
        noise_multiplier: Sigma calibrated for the planned participation.
        sample_rate: Poisson sample rate q.
        planned_rounds: Participation sigma was calibrated for.
        history: Opacus accountant history.
        rounds: Server rounds this client trained in.
        epsilon: Epsilon composed over ``history`` (``None`` when DP is off), for
            add/remove-one neighbours. It treats the dataset size as public: the example
            count, sample rate and sigma the client reveals are functions of it.
        replace_one_epsilon: Epsilon of the same history for replace-one neighbours
            (PLD accountant, pessimistic). Replace-one neighbours have the same size, so
            this one also covers what the client reveals about its size. Reported beside
            ``epsilon``; the budget is enforced on ``epsilon``.

    """

    accountant: str
    delta: float
    target_epsilon: float | None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    planned_rounds: int = 0
    history: tuple[HistoryEntry, ...] = ()
    rounds: tuple[int, ...] = field(default=())
    epsilon: float | None = None
    replace_one_epsilon: float | None = None

    @classmethod
    def empty(cls, privacy: PrivacyConfig) -> PrivacyLedger:
        """A ledger with nothing spent."""
        return cls(
            accountant=privacy.accountant,
            delta=privacy.delta,
            target_epsilon=privacy.target_epsilon,
            epsilon=0.0 if privacy.enabled else None,
            replace_one_epsilon=0.0 if privacy.enabled else None,
        )

    @property
    def steps(self) -> int:
        """DP-SGD steps taken over all rounds."""
        return sum(n for _, _, n in self.history)

    def calibrated(
        self, privacy: PrivacyConfig, sample_rate: float, steps_per_round: int, planned_rounds: int
    ) -> PrivacyLedger:
        """Fix sigma and q on first use; later calls return the ledger unchanged.

        Raises:
            ValueError: the stored sample rate differs (the client's data changed size).

        """
        target = privacy.target_epsilon
        if target is None or self.noise_multiplier is not None:
            if self.sample_rate is not None and not math.isclose(self.sample_rate, sample_rate):
                raise ValueError(
                    f"this client's sample rate changed from {self.sample_rate:.6g} to "
                    f"{sample_rate:.6g}; the ledger was calibrated for another dataset size"
                )
            return self
        sigma = privacy.noise_multiplier
        if sigma is None:
            sigma = calibrate_noise_multiplier(
                target,
                privacy.delta,
                sample_rate,
                planned_rounds * steps_per_round,
                privacy.accountant,
            )
        return replace(
            self, noise_multiplier=sigma, sample_rate=sample_rate, planned_rounds=planned_rounds
        )

    def projected_epsilon(self, steps: int) -> float | None:
        """Epsilon after ``steps`` more steps at the calibrated sigma and q."""
        if self.noise_multiplier is None or self.sample_rate is None:
            return None
        return compute_epsilon(
            self.accountant,
            merge_entry(self.history, (self.noise_multiplier, self.sample_rate, steps)),
            self.delta,
        )

    def check_budget(self, steps: int) -> None:
        """Raise :class:`BudgetExhaustedError` if ``steps`` more steps exceed the budget."""
        if self.target_epsilon is None:
            return
        projected = self.projected_epsilon(steps)
        if projected is not None and projected > self.target_epsilon * (1 + _EPS_SLACK):
            raise BudgetExhaustedError(
                f"privacy budget exhausted: epsilon spent {self.epsilon or 0.0:.3f}, one more "
                f"round ({steps} steps) would reach {projected:.3f} > target "
                f"{self.target_epsilon:g} at delta {self.delta:g}"
            )

    def record_round(self, server_round: int, history: tuple[HistoryEntry, ...]) -> PrivacyLedger:
        """The ledger after a round whose accountant history is ``history``."""
        private = self.target_epsilon is not None
        return replace(
            self,
            history=history,
            rounds=(*self.rounds, server_round),
            epsilon=compute_epsilon(self.accountant, history, self.delta) if private else None,
            replace_one_epsilon=replace_one_epsilon_of(history, self.delta) if private else None,
        )

    def record_plain_round(self, server_round: int) -> PrivacyLedger:
        """The ledger after a non-private round."""
        return replace(self, rounds=(*self.rounds, server_round))

    def to_json(self) -> str:
        """Serialize to JSON."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PrivacyLedger:
        """Inverse of ``dataclasses.asdict``."""
        fields = dict(raw)
        fields["history"] = tuple((float(s), float(q), int(n)) for s, q, n in raw["history"])
        fields["rounds"] = tuple(int(r) for r in raw["rounds"])
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def save(self, path: Path, client_id: str) -> None:
        """Write the ledger file atomically (see :mod:`sepals.common.ledger`)."""
        write_ledger_file(path, client_id, asdict(self))

    @classmethod
    def load(cls, path: Path, privacy: PrivacyConfig) -> PrivacyLedger:
        """The ledger at ``path``, or an empty one for ``privacy`` if there is none yet.

        Raises:
            LedgerFileError: the file exists but cannot be used.
            ValueError: the stored ledger was kept under another accountant or delta,
                so its spend cannot be composed with this budget.

        """
        if not path.exists():
            return cls.empty(privacy)
        doc = read_ledger_file(path)
        try:
            ledger = cls.from_dict(doc["ledger"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerFileError(f"{path}: malformed ledger: {exc}") from exc
        if privacy.enabled and (
            ledger.accountant != privacy.accountant or ledger.delta != privacy.delta
        ):
            raise ValueError(
                f"ledger {path} composes with accountant {ledger.accountant!r} at delta "
                f"{ledger.delta:g}; this client is configured for {privacy.accountant!r} "
                f"at delta {privacy.delta:g}"
            )
        # The budget is the client's current setting; the spend is what the file says.
        return replace(ledger, target_epsilon=privacy.target_epsilon)


def merge_entry(history: tuple[HistoryEntry, ...], entry: HistoryEntry) -> tuple[HistoryEntry, ...]:
    """Append ``entry`` the way Opacus's accountants do: merge equal (sigma, q) runs."""
    if history and history[-1][0] == entry[0] and history[-1][1] == entry[1]:
        return (*history[:-1], (entry[0], entry[1], history[-1][2] + entry[2]))
    return (*history, entry)
