"""Pure helpers of the 1M-parameter benchmark (no run, nothing timed)."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest

from benchmarks import million
from sepals.common.models import num_parameters


def test_model_has_about_one_million_parameters() -> None:
    count = num_parameters(million.make_model())
    assert abs(count - 1_000_000) <= 0.05 * 1_000_000
    assert count == million.mlp_parameters(million.IN_FEATURES, million.HIDDEN, million.NUM_CLASSES)


def test_mlp_parameters_counts_weights_and_biases() -> None:
    assert million.mlp_parameters(2, 3, 4) == 2 * 3 + 3 + 3 * 4 + 4


def test_app_matches_the_model_and_digits() -> None:
    app = million.make_app(seed="0")
    x, y = app.train_dataset[0]  # type: ignore[index]
    assert x.shape == (million.IN_FEATURES,)
    assert 0 <= int(y) < million.NUM_CLASSES
    assert app.privacy.target_epsilon == million.EPSILON
    assert app.test_dataset is not None


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [(0.9, "met"), (1.2, "met"), (1.2000001, "MISSED"), (3.0, "MISSED")],
)
def test_verdict(ratio: float, expected: str) -> None:
    assert million.verdict(ratio) == expected


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_verdict_rejects_non_positive_or_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="positive finite"):
        million.verdict(bad)


def _report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rounds": rows, "final": {"accuracy": 0.5, "epsilon": 2.0}}


def test_figures_of_divides_upload_by_accepted_clients() -> None:
    rows = [
        {"clients_accepted": 10, "upload_bytes": 1000, "seconds": 1.5},
        {"clients_accepted": 5, "upload_bytes": 500, "seconds": 2.0},
    ]
    fig = million.figures_of(_report(rows), seconds=9.0)
    assert fig.upload_bytes_per_client == pytest.approx(100.0)
    assert fig.round_seconds == pytest.approx(3.5)
    assert fig.seconds == 9.0
    assert (fig.accuracy, fig.epsilon) == (0.5, 2.0)


def test_figures_of_refuses_a_run_without_accepted_updates() -> None:
    rows = [{"clients_accepted": 0, "upload_bytes": 0, "seconds": 1.0}]
    with pytest.raises(ValueError, match="no round accepted"):
        million.figures_of(_report(rows), seconds=1.0)


def _result(ratio: float) -> million.MillionResult:
    return million.MillionResult(
        parameters=999_985,
        clients=10,
        rounds=3,
        seconds_plain=10.0,
        seconds_encrypted=10.0 * ratio,
        ratio=ratio,
        round_seconds_plain=6.0,
        round_seconds_encrypted=9.0,
        upload_bytes_plain=4e6,
        upload_bytes_encrypted=4.1e6,
        accuracy_plain=0.9,
        accuracy_encrypted=0.89,
        epsilon_plain=1.5,
        epsilon_encrypted=1.5,
    )


def test_format_result_prints_count_ratio_and_verdict() -> None:
    text = million.format_result(_result(1.5))
    assert "999,985" in text
    assert "1.50x (target <= 1.2x): MISSED" in text
    assert "rounds alone encrypted/plain 1.50x" in text
    assert "upload encrypted/plain 1.02x" in text
    assert million.format_result(_result(1.1)).endswith("met")


def test_run_million_rejects_bad_settings_before_running() -> None:
    with pytest.raises(ValueError, match="clients must be >= 1"):
        million.run_million(clients=0)


def test_import_starts_nothing() -> None:
    code = (
        "import sys, benchmarks.million; "
        "print(any(m in sys.modules for m in ('torch', 'ray', 'tenseal')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def test_cli_rejects_a_bad_flag_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert million.main(["--rounds", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --rounds must be >= 1"


def test_format_row_shows_startup_and_rounds() -> None:
    assert million.format_row("plain", {"round": 0, "startup_seconds": 12.34}) == (
        "    plain: start-up 12.3 s"
    )
    row = {"round": 2, "seconds": 4.0, "accuracy": 0.5, "epsilon": None, "clients_accepted": 10}
    line = million.format_row("encrypted", row)
    assert line == (
        "encrypted: round 2 4.0 s | accuracy 50.00% | epsilon off | 10 clients accepted"
    )
