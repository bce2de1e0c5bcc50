"""Privacy-loss-distribution accounting and the two neighbouring relations sepals reports.

Every client publishes its example count and its Poisson sample rate, so its dataset
size is public, and the relation its enforced epsilon is stated for is *zero-out*: two
datasets of the same size that differ in one example being replaced by a null example
that contributes no gradient (``dp-accounting``'s ``REPLACE_SPECIAL``). For DP-SGD's
Poisson-subsampled Gaussian it has exactly the numbers of add/remove-one, the convention
of Opacus and TF-Privacy. Beside it sepals prints the epsilon for *replace-one*
neighbours (one example replaced by any other), which is larger for the same noise. Both
come from the accountant that enforces the budget. The explanation every printed pair
points to: :data:`RELATIONS_DOC`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: The neighbouring relation of every enforced epsilon.
NEIGHBOURING_RELATION = "zero-out"
#: Where the two relations are explained.
RELATIONS_DOC = "docs/privacy.md#neighbouring-relations"
#: A summary flags a replace-one epsilon above this multiple of the zero-out one.
REPLACE_ONE_FLAG_RATIO = 1.25


def epsilon_pair(eps: float | None, replace_one: float | None, digits: int = 3) -> str:
    """``7.991 zero-out, 13.628 replace-one``: one epsilon pair as every line prints it.

    ``off`` when DP is off (``eps`` is ``None``).
    """
    if eps is None:
        return "off"
    text = f"{eps:.{digits}f} {NEIGHBOURING_RELATION}"
    if replace_one is not None:
        text += f", {replace_one:.{digits}f} replace-one"
    return text


def replace_one_flag(eps: float | None, replace_one: float | None) -> str:
    """A warning when the replace-one epsilon exceeds the zero-out one by more than 25%.

    Empty otherwise. A small client under a skewed split can reach twice the headline.
    """
    if eps is None or replace_one is None or eps <= 0:
        return ""
    if replace_one <= REPLACE_ONE_FLAG_RATIO * eps:
        return ""
    return (
        f"replace-one epsilon {replace_one:.3f} is {replace_one / eps:.1f}x the zero-out "
        f"epsilon (see {RELATIONS_DOC})"
    )


def summary_epsilon(final: Mapping[str, Any]) -> str:
    """A run's epsilon for its summary line, with what it holds against.

    ``final`` holds ``epsilon``, ``epsilon_replace_one`` and optionally
    ``epsilon_holds`` (``False`` when the run's DP randomness was seeded, ``None`` when
    DP is off).
    """
    eps = final.get("epsilon")
    if eps is None and final.get("epsilon_holds") is not None:
        return "none released (DP on: every update was declined or refused)"
    text = epsilon_pair(eps, final.get("epsilon_replace_one"))
    if eps is not None:
        text += f" ({RELATIONS_DOC})"
    if final.get("epsilon_holds") is False:
        text += " | EPSILON DOES NOT HOLD: seeded DP randomness (--insecure-reproducible)"
    flag = replace_one_flag(eps, final.get("epsilon_replace_one"))
    return f"{text} | {flag}" if flag else text


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
        replace_one: Replace-one neighbours; otherwise zero-out (the numbers of
            add/remove-one).
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
