"""Partitioning of a dataset into clients (IID, label-skewed, shards), and client sizes."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from sepals.common.data import (
    ArraySplit,
    load_dataset,
)
from sepals.common.synthetic import SyntheticSpec, client_data, client_sizes, is_synthetic


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
    return [p.copy() for p in _client_test_rows(name, num_clients, partition, seed)]


def client_test_rows(
    name: str, num_clients: int, partition: str, seed: int, client: int
) -> npt.NDArray[np.int64]:
    """Client ``client``'s rows of the held-out test split (see :func:`client_test_indices`)."""
    if not 0 <= client < num_clients:
        raise ValueError(f"client index {client} outside 0..{num_clients - 1}")
    check_partition(name, partition)
    return _client_test_rows(name, num_clients, partition, seed)[client].copy()


@functools.lru_cache(maxsize=16)
def _client_test_rows(
    name: str, num_clients: int, partition: str, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Every client's rows of the held-out test split, computed once per split."""
    if is_synthetic(name):
        sizes = [b for _, b in client_sizes(SyntheticSpec.parse(name), num_clients, seed)]
        ends = np.cumsum(sizes)
        return [np.arange(e - n, e, dtype=np.int64) for n, e in zip(sizes, ends, strict=True)]
    return _test_partitions(name, num_clients, str(PartitionSpec.parse(partition)), seed)


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


def client_split_sizes(
    name: str, num_clients: int, partition: str, seed: int
) -> list[tuple[int, int]]:
    """Per simulated client, ``(train, test)`` example counts, without building the splits.

    Raises:
        ValueError: the dataset cannot be split among ``num_clients`` clients, or the
            partition does not apply to the dataset.

    """
    check_partition(name, partition)
    if is_synthetic(name):
        return list(client_sizes(SyntheticSpec.parse(name), num_clients, seed))
    spec = str(PartitionSpec.parse(partition))
    train = _cached_partitions(name, num_clients, spec, seed, "train")
    test = _test_partitions(name, num_clients, spec, seed)
    return [(len(a), len(b)) for a, b in zip(train, test, strict=True)]


def client_example_caps(name: str, num_clients: int, partition: str, seed: int) -> list[int]:
    """Per simulated client, the most examples it can honestly claim in any reply.

    That is the larger of its training and local test split: the example count of a
    train reply and the count of an evaluate reply can never exceed it.
    """
    return [max(a, b) for a, b in client_split_sizes(name, num_clients, partition, seed)]


def client_train_sizes(name: str, num_clients: int, partition: str, seed: int) -> list[int]:
    """Per simulated client, the number of its training examples (client ``k`` at ``k``).

    Raises:
        ValueError: the dataset cannot be split among ``num_clients`` clients, or the
            partition does not apply to the dataset.

    """
    return [a for a, _ in client_split_sizes(name, num_clients, partition, seed)]


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
