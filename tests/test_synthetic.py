"""The synthetic(alpha, beta) federation: determinism, shapes, sizes, heterogeneity."""

from __future__ import annotations

import numpy as np
import pytest

from sepals.common.data import check_dataset_name, dataset_model_factory, load_dataset
from sepals.common.models import num_parameters
from sepals.common.partition import client_example_caps, client_partition, client_train_sizes
from sepals.common.synthetic import (
    CLASSES,
    FEATURES,
    SyntheticSpec,
    client_data,
    client_sizes,
)

fresh = client_data.__wrapped__  # bypass the cache: really generate again


def test_generation_is_deterministic_and_seeded():
    spec = SyntheticSpec(1.0, 1.0)
    a, b = fresh(spec, 0, 17), fresh(spec, 0, 17)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    other = fresh(spec, 1, 17)
    assert not np.array_equal(a.x_train[:5], other.x_train[:5])
    assert not np.array_equal(fresh(spec, 0, 18).x_test[:1], a.x_test[:1])


def test_shapes_and_types():
    spec = SyntheticSpec(0.5, 0.5)
    for k in range(20):
        d = fresh(spec, 3, k)
        assert d.x_train.dtype == np.float32 and d.x_test.dtype == np.float32
        assert d.y_train.dtype == np.int64 and d.y_test.dtype == np.int64
        assert d.x_train.shape == (len(d.y_train), FEATURES)
        assert d.x_test.shape == (len(d.y_test), FEATURES)
        assert d.y_train.min() >= 0 and d.y_train.max() < CLASSES
        assert np.all(np.isfinite(d.x_train))


def test_sizes_are_power_law_with_a_floor():
    spec = SyntheticSpec()
    sizes = client_sizes(spec, 1000, 0)
    train = np.array([a for a, _ in sizes])
    test = np.array([b for _, b in sizes])
    assert train.min() >= spec.min_train >= 10  # every client has work
    assert train.max() <= spec.max_train
    assert test.min() >= 1
    # heavy tail: the mean is well above the median, the largest far above the median
    assert train.mean() > 1.5 * np.median(train)
    assert train.max() > 8 * np.median(train)
    # sizes match the generated data, without generating it
    for k in (0, 1, 999):
        d = client_data(spec, 0, k)
        assert (len(d.y_train), len(d.y_test)) == sizes[k]
    assert client_sizes(spec, 3, 0) == sizes[:3]  # client k is the same in any federation


def _feature_centre_spread(spec: SyntheticSpec) -> float:
    means = [fresh(spec, 0, k).x_train.mean() for k in range(200)]
    return float(np.var(means))


def test_feature_heterogeneity_grows_with_beta():
    spreads = [_feature_centre_spread(SyntheticSpec(1.0, beta)) for beta in (0.0, 0.5, 1.0)]
    assert spreads[0] < spreads[1] < spreads[2]
    assert spreads[2] > 10 * spreads[0]


def test_alpha_shifts_all_logits_alike_as_in_the_original():
    """alpha shifts every class's weights and bias by the same u_k, so argmax labels
    and features are those of alpha = 0 (a property of Li et al.'s generator)."""
    a, b = fresh(SyntheticSpec(0.0, 1.0), 0, 5), fresh(SyntheticSpec(3.0, 1.0), 0, 5)
    assert np.array_equal(a.x_train, b.x_train)
    assert np.array_equal(a.y_train, b.y_train)


def test_labels_are_skewed_per_client():
    """Every client has its own model: its labels concentrate on few classes."""
    spec = SyntheticSpec(1.0, 1.0)
    top = [np.bincount(fresh(spec, 0, k).y_train, minlength=CLASSES).max() for k in range(50)]
    sizes = [len(fresh(spec, 0, k).y_train) for k in range(50)]
    assert np.mean(np.array(top) / np.array(sizes)) > 0.5


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("synthetic:1,1", "synthetic:1,1"),
        ("synthetic:0,0", "synthetic:0,0"),
        ("synthetic:0.50,0.5", "synthetic:0.5,0.5"),
        ("digits", "digits"),
    ],
)
def test_dataset_names(name, canonical):
    assert check_dataset_name(name) == canonical


@pytest.mark.parametrize(
    "name",
    [
        "synthetic",
        "synthetic:",
        "synthetic:1",
        "synthetic:1,2,3",
        "synthetic:a,b",
        "synthetic:-1,1",
        "synthetic:1,nan",
        "cifar10",
    ],
)
def test_bad_dataset_names(name):
    with pytest.raises(ValueError, match=r"synthetic|dataset"):
        check_dataset_name(name)


def test_registered_in_data():
    name = "synthetic:1,1"
    train, test = client_partition(name, 1000, "iid", 0, 999)
    own = client_data(SyntheticSpec(1.0, 1.0), 0, 999)
    assert np.array_equal(train.y, own.y_train) and np.array_equal(test.y, own.y_test)
    sizes = client_train_sizes(name, 1000, "iid", 0)
    assert sizes[999] == len(train) and min(sizes) >= 10
    caps = client_example_caps(name, 1000, "iid", 0)
    assert caps[999] == max(len(train), len(test))
    with pytest.raises(ValueError, match="federated by construction"):
        client_partition(name, 10, "dirichlet:0.5", 0, 0)
    with pytest.raises(ValueError, match="federated by construction"):
        client_train_sizes(name, 10, "shards:2", 0)


def test_load_dataset_unions_the_clients_and_builds_the_model():
    name = "synthetic:0,0"
    data = load_dataset(name, 0, num_clients=20)
    sizes = client_sizes(SyntheticSpec(0.0, 0.0), 20, 0)
    assert len(data.train) == sum(a for a, _ in sizes)
    assert len(data.test) == sum(b for _, b in sizes)
    assert data.num_classes == CLASSES and data.model == "logreg"
    model = data.model_factory()()
    assert num_parameters(model) == FEATURES * CLASSES + CLASSES  # logistic regression
    assert num_parameters(dataset_model_factory(name)()) == num_parameters(model)
    with pytest.raises(ValueError, match="num_clients"):
        load_dataset(name, 0)


def test_logistic_regression_learns_a_client_better_than_chance():
    """Real work: one client's own data is learnable (centralised sanity check)."""
    import torch

    spec_sizes = client_sizes(SyntheticSpec(1.0, 1.0), 200, 0)
    k = int(np.argmax([a for a, _ in spec_sizes]))
    d = client_data(SyntheticSpec(1.0, 1.0), 0, k)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = dataset_model_factory("synthetic:1,1")()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.from_numpy(d.x_train), torch.from_numpy(d.y_train)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    majority = np.bincount(d.y_train).max() / len(d.y_train)
    assert acc > majority
