from __future__ import annotations

import pytest

from sepals.client.privacy import compute_epsilon
from sepals.common.accounting import pld_epsilon, replace_one_epsilon

# The default digits run: sigma, sample rate and steps of one client after 30 rounds.
HISTORY = ((1.4148, 1 / 9, 270),)


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
