from __future__ import annotations

import numpy as np
import pytest

from sepals.common.config import EncryptionConfig
from sepals.common.data import load_dataset
from sepals.common.models import MLP, SmallCNN, build_seeded, get_flat, num_parameters, set_flat
from sepals.common.partition import PartitionSpec, client_partition, partition_indices
from sepals.simulations.cli import build_parser, config_from_args


@pytest.mark.parametrize(
    ("name", "n_train", "n_test"), [("digits", 1437, 360), ("breast_cancer", 455, 114)]
)
def test_bundled_datasets_split(name, n_train, n_test):
    d = load_dataset(name)
    assert (len(d.train), len(d.test)) == (n_train, n_test)
    assert d.train.x.dtype == np.float32 and np.isfinite(d.train.x).all()


def test_partitions_cover_train_split_disjointly():
    labels = load_dataset("digits").train.y
    for spec in ("iid", "dirichlet:0.3", "shards:2"):
        parts = partition_indices(labels, 10, PartitionSpec.parse(spec), seed=0)
        flat = np.concatenate(parts)
        assert len(np.unique(flat)) == len(flat), spec  # disjoint
        assert all(len(p) > 0 for p in parts), spec
        if spec == "iid":
            assert len(flat) == len(labels)


def test_dirichlet_is_skewed_and_iid_is_not():
    labels = load_dataset("digits").train.y
    iid = partition_indices(labels, 10, PartitionSpec.parse("iid"), seed=0)
    skew = partition_indices(labels, 10, PartitionSpec.parse("dirichlet:0.1"), seed=0)

    def max_share(parts):
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert max_share(skew) > 2 * max_share(iid)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "shards:2"])
def test_partitioning_is_seeded(spec):
    labels = load_dataset("digits").train.y
    parse = PartitionSpec.parse
    a = partition_indices(labels, 5, parse(spec), seed=3)
    b = partition_indices(labels, 5, parse(spec), seed=3)
    c = partition_indices(labels, 5, parse(spec), seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_client_partition_returns_its_shards():
    train, test = client_partition("digits", 5, "iid", 3, 2)
    assert len(train) in (287, 288) and len(test) == 72


def test_partition_spec_defaults_and_round_trip():
    assert PartitionSpec.parse("dirichlet").alpha == 0.5
    assert PartitionSpec.parse("shards").shards == 2
    for text in ("iid", "dirichlet:0.3", "shards:4"):
        assert str(PartitionSpec.parse(text)) == text


@pytest.mark.parametrize("text", ["dirichlet:abc", "shards:0", "random", "iid:3"])
def test_bad_partition_specs(text):
    with pytest.raises(ValueError):
        PartitionSpec.parse(text)


def test_models_round_trip_and_seeding():
    m1 = build_seeded(lambda: MLP(64, 10), 7)
    m2 = build_seeded(lambda: MLP(64, 10), 7)
    np.testing.assert_array_equal(get_flat(m1), get_flat(m2))
    cnn = SmallCNN()
    w = np.random.default_rng(0).normal(size=num_parameters(cnn))
    set_flat(cnn, w)
    np.testing.assert_allclose(get_flat(cnn), w, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        set_flat(cnn, w[:-1])


def test_cli_defaults_match_the_default_job():
    cfg = config_from_args(build_parser().parse_args([]))
    assert (cfg.dataset, cfg.clients, cfg.partition) == ("digits", 10, "iid")
    assert cfg.privacy.target_epsilon == 8.0 and cfg.privacy.delta == 1e-5
    assert cfg.encryption.scheme == "bfv"
    # the grid is sized for the federation: max_clients is the number of clients
    assert cfg.encryption.max_clients == 10
    assert cfg.encryption.quant_step < EncryptionConfig().quant_step / 9
    assert config_from_args(build_parser().parse_args(["--scheme", "ckks"])).encryption.scheme == (
        "ckks"
    )


def test_default_learning_rate_follows_the_budget():
    """Digits: 0.4 without DP; with DP smaller the noisier each client's steps are.

    ``--noise-shares`` lowers no client's noise, so it changes no rate either.
    """

    def lr(*argv: str) -> float:
        return config_from_args(build_parser().parse_args(list(argv))).federation.learning_rate

    assert lr("--epsilon", "0") == 0.4
    local = [lr("--epsilon", e) for e in ("1", "3", "8")]
    shared = [lr("--epsilon", e, "--noise-shares", "5") for e in ("1", "3", "8")]
    assert local == sorted(local) and local[-1] < 0.4
    assert shared == local
    assert lr() == lr("--epsilon", "8") == pytest.approx(0.214)
    assert lr("--epsilon", "1", "--lr", "0.3") == 0.3
    # Datasets without a budget rule keep their one tuned rate.
    assert lr("--dataset", "breast_cancer", "--epsilon", "1") == lr(
        "--dataset", "breast_cancer", "--epsilon", "0"
    )


def test_cli_epsilon_zero_and_no_encryption():
    cfg = config_from_args(build_parser().parse_args(["--epsilon", "0", "--no-encryption"]))
    assert not cfg.privacy.enabled and not cfg.encryption.enabled


@pytest.mark.parametrize("argv", [["--epsilon", "-1"], ["--clients", "0"], ["--partition", "x"]])
def test_cli_rejects_bad_flags(argv):
    with pytest.raises(ValueError):
        config_from_args(build_parser().parse_args(argv))


def test_progress_line_shows_codec_and_quantization_error(capsys):
    from sepals.simulations.cli import progress_line

    row = {
        "round": 3,
        "accuracy": 0.5,
        "loss": 1.0,
        "epsilon": 2.0,
        "upload_bytes": 1000,
        "download_bytes": 2000,
        "seconds": 1.5,
        "clients_declined": 0,
        "clients_excluded": 0,
        "codec": "bfv-q2",
        "quant_error": 1.23e-4,
    }
    progress_line(row, 30)
    assert "bfv-q2 q-err 1.2e-04" in capsys.readouterr().out
    progress_line({**row, "codec": "ckks", "quant_error": None}, 30)
    assert "ckks q-err n/a" in capsys.readouterr().out


def test_check_client_sizes_refuses_empty_clients_and_warns_below_two_batches():
    from sepals.common.partition import check_client_sizes

    assert check_client_sizes([64, 100], batch_size=32) == []
    warnings = check_client_sizes([64, 63, 5], batch_size=32)
    assert warnings == [
        "2 of 3 clients have fewer than two batches of 32 training examples: "
        "client-1 (63), client-2 (5)"
    ]
    (many,) = check_client_sizes([1] * 30, batch_size=1)
    assert many.startswith("30 of 30 clients") and many.endswith("and 20 more")
    with pytest.raises(ValueError, match=r"2 of 4 clients get no training example: client-1, c3"):
        check_client_sizes([5, 0, 7, 0], batch_size=1, names=["c0", "client-1", "c2", "c3"])
    with pytest.raises(ValueError, match="and 5 more"):
        check_client_sizes([0] * 15, batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        check_client_sizes([1], batch_size=0)


@pytest.mark.parametrize(
    ("clients", "spec", "match"),
    [
        (2000, "iid", "cannot split 1437 examples among 2000 clients"),
        (800, "shards:2", "1600 shards"),
        (800, "dirichlet:0.5", "cannot split 1437 examples among 800 clients with partition"),
    ],
)
def test_partition_indices_fails_clearly(clients, spec, match, recwarn):
    labels = load_dataset("digits").train.y
    with pytest.raises(ValueError, match=match):
        partition_indices(labels, clients, PartitionSpec.parse(spec), seed=0)
    assert not [w for w in recwarn if "flwr_datasets" in str(w.filename)]


def test_more_clients_than_test_examples_still_split():
    """digits at 400 clients: 360 held-out examples, so some clients get no local test."""
    from sepals.common.partition import check_client_sizes, client_example_caps, client_train_sizes

    sizes = client_train_sizes("digits", 400, "iid", 0)
    assert sum(sizes) == 1437 and min(sizes) >= 3
    (warning,) = check_client_sizes(sizes, batch_size=16)
    assert warning.startswith("400 of 400 clients have fewer than two batches")
    caps = client_example_caps("digits", 400, "iid", 0)
    assert min(caps) >= min(sizes)
    _, test = client_partition("digits", 400, "iid", 0, 399)
    assert len(test) == 0
    _, test = client_partition("digits", 400, "iid", 0, 0)
    assert len(test) == 1
