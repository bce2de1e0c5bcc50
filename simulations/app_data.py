"""Partitions of an app's own data across simulated clients.

An own app hands sepals whole datasets; these functions split them over the simulated
clients with the run's partition scheme (IID or label-skewed) from the run's seed, and
give the server each client's example cap.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Subset

from sepals.common.accounting import check_delta
from sepals.common.partition import (
    PartitionSpec,
    check_client_sizes,
    partition_indices,
    partition_like,
)
from sepals.simulations.config import AppSource


def _labels_of(ds: Any) -> npt.NDArray[Any]:
    """The targets of a dataset of ``(x, y)`` pairs, one row per example."""
    if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) >= 2:
        y = ds.tensors[1]
    else:
        y = torch.stack([torch.as_tensor(ds[i][1]) for i in range(len(ds))])
    arr = y.detach().cpu().numpy()
    return arr.reshape(len(arr), -1)


def _partition_labels(
    targets: npt.NDArray[Any], spec: PartitionSpec, reference: npt.NDArray[Any] | None = None
) -> npt.NDArray[np.int64]:
    """Integer labels to partition by: class labels as they are, others binned.

    A continuous target is binned by the deciles of ``reference`` (default: of
    ``targets`` itself), so a test split is binned like its train split.
    """
    n = len(targets)
    if spec.kind == "iid":
        return np.zeros(n, dtype=np.int64)
    ref = targets if reference is None else reference
    for t in (targets, ref):
        if t.shape[1] != 1:
            raise ValueError(
                f"partition {spec} needs one target per example; this app's targets have "
                f"{t.shape[1]} values each (use iid or give client_data)"
            )
    y, r = targets[:, 0], ref[:, 0]
    if np.issubdtype(r.dtype, np.integer) or np.all(np.mod(r, 1) == 0):
        return y.astype(np.int64)
    # A continuous target: partition by its decile (label skew becomes target skew).
    edges = np.quantile(r, np.linspace(0.0, 1.0, 11)[1:-1])
    return np.digitize(y, edges).astype(np.int64)


@functools.lru_cache(maxsize=8)
def _app_partitions(
    source: AppSource, clients: int, partition: str, seed: int
) -> tuple[list[npt.NDArray[np.int64]], list[npt.NDArray[np.int64]] | None]:
    """Row indices of every client's train and test share of the app's data.

    The test data is split IID under the ``iid`` partition (when it has an example per
    client), else so that each client's share follows its train label (or binned
    target) distribution, as :func:`sepals.common.data.partition_like` describes.
    """
    app = source.load()
    train, test = app.train_dataset, app.test_dataset
    if train is None:
        raise ValueError("the app gives neither train_data nor client_data")
    spec = PartitionSpec.parse(partition)
    train_targets = _labels_of(train)
    labels = _partition_labels(train_targets, spec)
    train_parts = partition_indices(labels, clients, spec, seed)
    test_parts = None
    if test is not None and spec.kind != "iid" and len(test) > 0:  # type: ignore[arg-type]
        test_labels = _partition_labels(_labels_of(test), spec, train_targets)
        test_parts = partition_like(test_labels, labels, train_parts, seed)
    elif test is not None and len(test) >= clients:  # type: ignore[arg-type]
        zeros = np.zeros(len(test), dtype=np.int64)  # type: ignore[arg-type]
        test_parts = partition_indices(zeros, clients, PartitionSpec("iid"), seed)
    return train_parts, test_parts


def app_client_data(
    source: AppSource, clients: int, partition: str, seed: int, client: int
) -> tuple[Any, Any]:
    """Client ``client``'s ``(train, test-or-None)`` datasets of an own app."""
    app = source.load()
    if app.client_data is not None:
        train, test = app.client_data(client, clients)
        return train, test
    train_parts, test_parts = _app_partitions(source, clients, partition, seed)
    test = None
    if test_parts is not None and app.test_dataset is not None and len(test_parts[client]):
        test = Subset(app.test_dataset, test_parts[client].tolist())
    return Subset(app.train_dataset, train_parts[client].tolist()), test  # type: ignore[arg-type]


@functools.lru_cache(maxsize=8)
def _app_sizes(
    source: AppSource, clients: int, partition: str, seed: int
) -> tuple[tuple[int, int], ...]:
    """Every client's ``(train, test)`` example counts.

    A ``client_data`` that can count without building the data (``client_data.sizes(
    clients)``, as a bundled dataset's does) is asked; otherwise every share is built.
    """
    app = source.load()
    count = getattr(app.client_data, "sizes", None)
    if count is not None:
        return tuple((int(n), int(m)) for n, m in count(clients))
    sizes = []
    for pid in range(clients):
        train, test = app_client_data(source, clients, partition, seed, pid)
        sizes.append((len(train), 0 if test is None else len(test)))
    return tuple(sizes)


def app_train_sizes(source: AppSource, clients: int, partition: str, seed: int) -> list[int]:
    """Per client, its number of training examples (client ``k`` at ``k``)."""
    return [n for n, _ in _app_sizes(source, clients, partition, seed)]


def app_caps(
    source: AppSource, clients: int, partition: str, seed: int, *, delta: float | None = None
) -> list[int]:
    """Per client, the most examples it may claim: the larger of its train and test data.

    Raises:
        ValueError: a client has no training data, or (with DP at ``delta``) has
            ``delta >= 1/n``.

    """
    sizes = _app_sizes(source, clients, partition, seed)
    train = [n for n, _ in sizes]
    check_client_sizes(train, 1)
    if delta is not None:
        check_delta(delta, train)
    return [max(n, m, 1) for n, m in sizes]


def client_test_owner(
    source: AppSource, clients: int, partition: str, seed: int
) -> npt.NDArray[np.int64] | None:
    """Per row of the app's ``test_data``, the client whose test data it is (``-1``: none).

    Known when sepals splits the app's test data, or when its ``client_data`` tells each
    client's rows (``client_data.test_rows(client, clients)``, as a bundled dataset's
    does); ``None`` otherwise.
    """
    app = source.load()
    test = app.test_dataset
    if test is None:
        return None
    parts: list[npt.NDArray[np.int64]] | None
    if app.client_data is None:
        parts = _app_partitions(source, clients, partition, seed)[1]
    else:
        rows_of = getattr(app.client_data, "test_rows", None)
        parts = None if rows_of is None else [rows_of(k, clients) for k in range(clients)]
    if parts is None:
        return None
    owner = np.full(len(test), -1, dtype=np.int64)  # type: ignore[arg-type]
    for k, rows in enumerate(parts):
        owner[np.asarray(rows, dtype=np.int64)] = k
    return owner
