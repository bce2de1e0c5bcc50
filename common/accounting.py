"""The epsilon of a client's history under the replace-one neighbouring relation.

Sepals reports epsilon the way Opacus and TF-Privacy do: for *add/remove-one*
neighbours (datasets that differ by one example being present or absent), with the
client's dataset size treated as public. A client does send its example count in the
clear, so that convention fits; but if the dataset size must stay private, the right
relation is *replace-one* (datasets of equal size that differ in one example), whose
epsilon is larger for the same noise. :func:`replace_one_epsilon` computes it from the
same accountant history with Google's ``dp-accounting`` privacy-loss-distribution
accountant, which supports replace-one for Poisson-subsampled Gaussian steps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence


def replace_one_epsilon(
    history: Iterable[tuple[float, float, int]], delta: float, discretization: float = 3e-3
) -> float:
    """Epsilon at ``delta`` of ``history`` for replace-one neighbours (PLD accountant).

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` runs, as in the ledger.
        delta: Target delta.
        discretization: PLD value discretization interval (smaller is tighter, slower).

    Raises:
        ValueError: a history entry is out of range.

    """
    return pld_epsilon(history, delta, replace_one=True, discretization=discretization)


def pld_epsilon(
    history: Iterable[tuple[float, float, int]],
    delta: float,
    *,
    replace_one: bool,
    discretization: float = 3e-3,
) -> float:
    """Epsilon at ``delta`` of ``history`` with ``dp-accounting``'s PLD accountant.

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` runs, as in the ledger.
        delta: Target delta.
        replace_one: Replace-one neighbours; otherwise add/remove-one.
        discretization: PLD value discretization interval (smaller is tighter, slower).

    Raises:
        ValueError: a history entry is out of range.

    """
    import dp_accounting
    from dp_accounting import pld

    entries = [(float(s), float(q), int(n)) for s, q, n in history]
    if not entries:
        return 0.0
    for sigma, q, steps in entries:
        if not (sigma > 0 and 0 < q <= 1 and steps >= 0):
            raise ValueError(f"history entry out of range: {(sigma, q, steps)}")
    accountant = pld.PLDAccountant(
        neighboring_relation=(
            dp_accounting.NeighboringRelation.REPLACE_ONE
            if replace_one
            else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        ),
        value_discretization_interval=discretization,
    )
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        for sigma, q, steps in entries:
            if steps:
                accountant.compose(
                    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                    steps,
                )
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def delta_problem(delta: float, num_examples: int) -> str | None:
    """Why ``delta`` gives no meaningful guarantee for ``num_examples`` examples, or ``None``.

    A mechanism that publishes one random example in full is (0, 1/n)-DP, so delta must
    lie below 1/n (well below, by convention) for (epsilon, delta) to say anything.
    """
    if num_examples >= 1 and delta * num_examples >= 1.0:
        return (
            f"delta {delta:g} is not below 1/n = {1.0 / num_examples:.3g} for a client with "
            f"{num_examples} training examples (publishing one example at random meets "
            f"delta = 1/n): choose delta < {1.0 / num_examples:.3g}"
        )
    return None


def check_delta(delta: float, sizes: Sequence[int], names: Sequence[str] | None = None) -> None:
    """Refuse a run in which ``delta >= 1/n`` for any client (one line naming the first).

    Raises:
        ValueError: some client has ``delta * n >= 1``.

    """
    labels = list(names) if names is not None else [f"client-{k}" for k in range(len(sizes))]
    bad = [(n, lab) for n, lab in zip(sizes, labels, strict=True) if delta_problem(delta, n)]
    if bad:
        n, lab = min(bad)
        problem = delta_problem(delta, n)
        raise ValueError(f"{len(bad)} of {len(sizes)} clients, e.g. {lab}: {problem}")
