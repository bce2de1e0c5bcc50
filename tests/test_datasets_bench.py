"""The built-in datasets benchmark's helpers and the bundled sets' preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.datasets import (
    CLEAR_MARGIN,
    Row,
    clearly_above,
    format_row,
    main,
    majority_rate,
    parse_rounds,
    verdict,
)
from sepals.common.data import STANDARDIZED, ArraySplit, _raw, load_dataset, standardize
from sepals.simulations.cli import build_parser, config_from_args
from sepals.simulations.defaults import DATASET_DEFAULTS


def test_majority_rate_is_the_share_of_the_most_frequent_class():
    assert majority_rate(np.array([0, 1, 1, 2, 1])) == pytest.approx(0.6)
    assert majority_rate(np.array([3, 3, 3])) == 1.0
    assert majority_rate(np.array([0, 1])) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        majority_rate(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="non-negative"):
        majority_rate(np.array([0, -1]))


def test_verdict_needs_the_margin_above_majority():
    assert verdict(0.75, 0.6) == "met"  # 15 points above
    assert verdict(0.6 + CLEAR_MARGIN, 0.6) == "met"  # exactly 10 points above
    assert verdict(0.69, 0.6) == "MISSED"
    assert verdict(0.6, 0.6) == "MISSED"  # the majority-class classifier
    assert verdict(None, 0.1) == "MISSED"  # no accuracy measured
    assert clearly_above(0.5, 0.1, margin=0.4) and not clearly_above(0.49, 0.1, margin=0.4)


def test_row_formats_its_figures_and_verdict():
    row = Row("breast_cancer", "iid", 10, 0.6283, 0.9649, 0.9386, 7.98, 61.0)
    line = format_row(row)
    assert line.startswith("breast_cancer") and line.endswith("met")
    for text in ("62.83%", "96.49%", "93.86%", "7.980"):
        assert text in line
    low = Row("breast_cancer", "iid", 10, 0.6283, 0.6283, None, None, 1.0)
    assert low.verdict == "MISSED" and "n/a" in format_row(low)


def test_parse_rounds():
    assert parse_rounds(["mnist5k=10", "digits = 3"]) == {"mnist5k": 10, "digits": 3}
    for bad in ("mnist5k", "mnist5k=0", "=3", "mnist5k=x"):
        with pytest.raises(ValueError, match="DATASET=ROUNDS"):
            parse_rounds([bad])


def test_bad_flags_exit_2_before_running(capsys):
    assert main(["--datasets", "cifar"]) == 2
    assert "unknown dataset 'cifar'" in capsys.readouterr().err
    assert main(["--partitions", "dirichlet:x"]) == 2
    assert main(["--datasets", "digits", "--rounds", "mnist5k=3"]) == 2
    assert "not benchmarked" in capsys.readouterr().err


def test_standardize_uses_train_statistics_only():
    train = ArraySplit(
        np.array([[1.0, 10.0, 5.0], [3.0, 30.0, 5.0]], dtype=np.float32), np.array([0, 1])
    )
    test = ArraySplit(np.array([[5.0, 0.0, 7.0]], dtype=np.float32), np.array([1]))
    new_train, new_test = standardize(train, test)
    # train: mean (2, 20, 5), std (1, 10, 0 -> 1): the test row uses exactly these.
    np.testing.assert_allclose(new_train.x, [[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0]])
    np.testing.assert_allclose(new_test.x, [[3.0, -2.0, 2.0]])
    assert new_test.x.dtype == np.float32
    np.testing.assert_array_equal(new_test.y, test.y)
    with pytest.raises(ValueError, match="feature shape"):
        standardize(train, ArraySplit(np.zeros((1, 2), dtype=np.float32), np.array([0])))
    with pytest.raises(ValueError, match="empty"):
        standardize(ArraySplit(np.zeros((0, 3), dtype=np.float32), np.zeros(0, np.int64)))


def test_breast_cancer_is_standardized_with_its_train_split():
    assert "breast_cancer" in STANDARDIZED and "digits" not in STANDARDIZED
    d = load_dataset("breast_cancer", seed=0)
    np.testing.assert_allclose(d.train.x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(d.train.x.std(axis=0), 1.0, atol=1e-4)
    # The test split is mapped with the train split's mean and std, not its own.
    from sklearn.model_selection import train_test_split

    x, y, _ = _raw("breast_cancer")
    rows_train, rows_test = train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=y, random_state=0
    )
    raw = x[rows_train].astype(np.float64)
    mean, std = raw.mean(axis=0), raw.std(axis=0)
    np.testing.assert_allclose(d.test.x, (x[rows_test] - mean) / std, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(d.test.y, y[rows_test])
    assert np.abs(d.test.x.mean(axis=0)).max() > 1e-3  # not re-centred on its own


def test_digits_is_left_as_pixels_in_unit_range():
    d = load_dataset("digits")
    assert d.train.x.min() >= 0.0 and d.train.x.max() <= 1.0


def test_dataset_defaults_reach_the_config():
    args = build_parser().parse_args(["--dataset", "breast_cancer"])
    config = config_from_args(args)
    want = DATASET_DEFAULTS["breast_cancer"]
    assert config.federation.rounds == want["rounds"]
    assert config.federation.learning_rate == want["lr"]
    assert config.federation.batch_size == want["batch_size"]
    assert config.privacy.max_grad_norm == want["max_grad_norm"]
