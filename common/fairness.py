"""The spread of a metric across clients: how well the model serves its worst clients.

One global accuracy hides which clients a model serves badly. :func:`client_spread`
summarizes per-client values of a metric (each client's accuracy on its own test split,
say) by their count, minimum, median, maximum and the mean of the worst 10% of clients
(``ceil(count / 10)`` of them, at least one). "Worst" is the lowest values for a
metric where higher is better (accuracy, R^2) and the highest for one where lower is
better (an error).

The module is pure: it reads numbers and returns numbers, and it is shared by the
simulation (the evaluator's per-client test splits) and the server (federated
evaluation replies).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

WORST_SHARE_PERCENT = 10
"""The share of clients averaged into :attr:`ClientSpread.worst10_mean`, in percent."""


def worst_count(count: int) -> int:
    """How many clients are the worst 10% of ``count``: ``ceil(count / 10)``, at least 1.

    Raises:
        ValueError: ``count`` is below 1.

    """
    if count < 1:
        raise ValueError(f"the worst 10% needs at least one client, got count {count}")
    return max(1, -(-count * WORST_SHARE_PERCENT // 100))


@dataclass(frozen=True)
class ClientSpread:
    """The spread of one metric across clients.

    Attributes:
        count: Clients with a value.
        min: Smallest value.
        median: Median value (the mean of the middle two for an even count).
        max: Largest value.
        worst10_mean: Mean of the worst ``worst_count`` values.
        worst_count: ``ceil(count / 10)``, at least 1.
        higher_is_better: Whether the worst values are the lowest (else the highest).

    """

    count: int
    min: float
    median: float
    max: float
    worst10_mean: float
    worst_count: int
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"a spread needs count >= 1, got {self.count}")
        if not 1 <= self.worst_count <= self.count:
            raise ValueError(f"worst_count must lie in 1..{self.count}, got {self.worst_count}")
        values = (self.min, self.median, self.max, self.worst10_mean)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"a spread's values must be finite, got {values}")
        if not self.min <= self.median <= self.max:
            raise ValueError(
                f"need min <= median <= max, got {self.min}, {self.median}, {self.max}"
            )
        if not self.min <= self.worst10_mean <= self.max:
            raise ValueError(
                f"worst10_mean {self.worst10_mean} lies outside [{self.min}, {self.max}]"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (keys as the attributes)."""
        return asdict(self)


def client_spread(values: Iterable[float], *, higher_is_better: bool = True) -> ClientSpread:
    """The spread of per-client ``values`` of a metric.

    Args:
        values: One value per client, in any order.
        higher_is_better: ``True`` for accuracy-like metrics (the worst clients have the
            lowest values), ``False`` for errors (the worst have the highest).

    Raises:
        ValueError: ``values`` is empty, or a value is not a finite number.

    """
    clean: list[float] = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"client value #{i} is a {type(value).__name__}, not a number")
        if not math.isfinite(value):
            raise ValueError(f"client value #{i} is {value!r}, not a finite number")
        clean.append(float(value))
    if not clean:
        raise ValueError("no client values: a spread needs at least one client")
    ordered = sorted(clean)
    n = len(ordered)
    mid = n // 2
    median = ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0
    k = worst_count(n)
    worst = ordered[:k] if higher_is_better else ordered[n - k :]
    # Kept inside [min, max] despite rounding of the sum.
    worst_mean = min(max(math.fsum(worst) / k, ordered[0]), ordered[-1])
    return ClientSpread(
        count=n,
        min=ordered[0],
        median=median,
        max=ordered[-1],
        worst10_mean=worst_mean,
        worst_count=k,
        higher_is_better=higher_is_better,
    )


def _value(value: float, percent: bool) -> str:
    if percent:
        return f"{100.0 * value:.1f}".removesuffix(".0") + "%"
    return f"{value:.4g}"


def format_spread(spread: dict[str, Any] | None, metric_name: str = "accuracy") -> str:
    """The spread (as :meth:`ClientSpread.to_dict` gives it) in a few words.

    ``clients min 83.3% med 91.7% max 100% worst10% 83.3%`` for accuracy (a percentage),
    ``clients r2 min 0.51 med ...`` for an app's own metric; ``""`` for ``None``.
    """
    if not spread:
        return ""
    pct = metric_name == "accuracy"
    name = "" if pct else f" {metric_name}"
    return (
        f"clients{name} min {_value(spread['min'], pct)} med {_value(spread['median'], pct)} "
        f"max {_value(spread['max'], pct)} worst10% {_value(spread['worst10_mean'], pct)}"
    )
