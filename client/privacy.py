"""A client's privacy bookkeeping, kept apart from the privacy math.

:class:`PrivacyLedger` is the persistent record: the Opacus accountant history (one
``(noise_multiplier, sample_rate, steps)`` entry per run of identical steps), the rounds
the client joined, and the resulting epsilon. It is a frozen value: each round yields a
new ledger, which the client stores *before* it sends its update. The math (calibrating
sigma, composing epsilon for both neighbouring relations) is in
:mod:`sepals.client.epsilon`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sepals.client.epsilon import (
    EPSILON_TOLERANCE,
    PLD_DISCRETIZATION,
    HistoryEntry,
    calibrate_noise_multiplier,
    calibration_orders,
    compute_epsilon,
    rdp_replace_one_epsilon,
    replace_one_epsilon_of,
)
from sepals.common.config import PrivacyConfig
from sepals.common.errors import BudgetExhaustedError, TrainingInputError
from sepals.common.ledger import LedgerFileError, read_ledger_file, write_ledger_file

__all__ = [
    "EPSILON_TOLERANCE",
    "PLD_DISCRETIZATION",
    "HistoryEntry",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "calibration_orders",
    "compute_epsilon",
    "merge_entry",
    "planned_participation",
    "poisson_schedule",
    "rdp_replace_one_epsilon",
    "replace_one_epsilon_of",
]

# A projected epsilon may exceed the target by this relative slack before a round is
# refused; it absorbs float noise in the accountants, never a real overspend.
_EPS_SLACK = 1e-9


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
        explanations: The explanation releases of the plan this client has made (each
            is one Gaussian release, an entry ``(sigma_e, 1.0, 1)`` of ``history``).
        epsilon: Epsilon composed over ``history`` (``None`` when DP is off), for
            zero-out neighbours (one example replaced by a null example; the same numbers
            as add/remove-one with the dataset size public, which it is: the example
            count, sample rate and sigma the client reveals are functions of it). The
            budget is enforced on it.
        replace_one_epsilon: Epsilon of the same history, by the same accountant, for
            replace-one neighbours (one example replaced by any other), reported beside
            ``epsilon``.

    """

    accountant: str
    delta: float
    target_epsilon: float | None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    planned_rounds: int = 0
    history: tuple[HistoryEntry, ...] = ()
    rounds: tuple[int, ...] = field(default=())
    explanations: tuple[int, ...] = field(default=())
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
        self,
        privacy: PrivacyConfig,
        sample_rate: float,
        steps_per_round: int,
        planned_rounds: int,
        reserve: tuple[HistoryEntry, ...] = (),
    ) -> PrivacyLedger:
        """Fix sigma and q on first use; later calls return the ledger unchanged.

        ``reserve``: releases the plan holds after training (an explanation's
        ``(sigma_e, 1.0, 1)``), which sigma leaves room for in the same budget.

        Raises:
            ValueError: the stored sample rate differs (the client's data changed size).

        """
        target = privacy.target_epsilon
        if target is None or self.noise_multiplier is not None:
            if self.sample_rate is not None and not math.isclose(self.sample_rate, sample_rate):
                raise TrainingInputError(
                    "training data changed size since the ledger was calibrated",
                    f"this client's sample rate changed from {self.sample_rate:.6g} to "
                    f"{sample_rate:.6g}; the ledger was calibrated for another dataset size",
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
                reserve,
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
            replace_one_epsilon=(
                replace_one_epsilon_of(self.accountant, history, self.delta) if private else None
            ),
        )

    def check_release(self, sigma: float) -> None:
        """Raise :class:`BudgetExhaustedError` if one Gaussian release at ``sigma`` exceeds it.

        A release of a sum whose every example moves it by at most the clipping norm is
        the accountant entry ``(sigma, 1.0, 1)``.
        """
        if self.target_epsilon is None:
            return
        projected = compute_epsilon(
            self.accountant, merge_entry(self.history, (sigma, 1.0, 1)), self.delta
        )
        if projected > self.target_epsilon * (1 + _EPS_SLACK):
            raise BudgetExhaustedError(
                f"privacy budget exhausted: epsilon spent {self.epsilon or 0.0:.3f}, the "
                f"explanation release (sigma {sigma:.3g}) would reach {projected:.3f} > target "
                f"{self.target_epsilon:g} at delta {self.delta:g}"
            )

    def record_release(self, release: int, sigma: float) -> PrivacyLedger:
        """The ledger after explanation release ``release``, a Gaussian release at ``sigma``."""
        if self.target_epsilon is None:
            return replace(self, explanations=(*self.explanations, release))
        history = merge_entry(self.history, (sigma, 1.0, 1))
        return replace(
            self,
            history=history,
            explanations=(*self.explanations, release),
            epsilon=compute_epsilon(self.accountant, history, self.delta),
            replace_one_epsilon=replace_one_epsilon_of(self.accountant, history, self.delta),
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
        fields["explanations"] = tuple(int(r) for r in raw.get("explanations", ()))
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
