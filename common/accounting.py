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
from collections.abc import Iterable


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
