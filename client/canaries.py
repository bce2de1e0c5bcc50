"""White-box gradient canaries for the privacy audit (simulations only).

A canary is a fixed unit direction ``u`` in parameter space: the unit vector of one
parameter (Dirac canaries, as the audit places them) or a random direction. Every
canary, included or not, is ONE row of its holder's training data, Poisson-sampled like
any other row. When a step samples it, an *included* canary's per-sample gradient is
exactly ``C * u`` (``C`` = ``max_grad_norm``) and a left-out canary's is zero: a null
example. So inclusion changes neither the example count, the sample rate, sigma nor the
FedAvg weight, and the two runs an audit tells apart are zero-out neighbours, the
relation the claimed epsilon is stated for (docs/privacy.md#neighbouring-relations).
The row is injected into Opacus's per-sample gradients (``p.grad_sample``) before
clipping and noise, so the DP-SGD optimizer clips, sums and noises it like a real
example (Steinke, Nasr and Jagielski, NeurIPS 2023; Andrew et al., ICLR 2024).

Canary rows are marked by a negative label ``-(1 + j)`` (``j``: the canary's index in
the client's list) and zero features. :meth:`ClientCanaries.strip` removes them from a
batch before the forward pass and remembers which were sampled;
:meth:`ClientCanaries.inject` appends their gradient rows after the backward pass.

Canaries wrap a client's training data: :meth:`ClientCanaries.add_rows` returns a
:class:`CanaryData` that holds the real rows, the marked rows and the hook, and DP-SGD
(:func:`sepals.client.training.train_round`) runs the hook for such data only. Only a
privacy audit wraps data this way, from a :class:`CanarySpec` handed to the simulated
clients; a deployed client's data is its own and never holds any.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset, TensorDataset


def canary_directions(seed: int, count: int, dimension: int) -> npt.NDArray[np.float64]:
    """``count`` random unit vectors of length ``dimension`` (rows), drawn from ``seed``.

    Raises:
        ValueError: ``count`` or ``dimension`` is below 1.

    """
    if count < 1 or dimension < 1:
        raise ValueError(f"count and dimension must be >= 1, got {count}, {dimension}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA4A27]))
    g = rng.standard_normal((count, dimension))
    norms: npt.NDArray[np.float64] = np.linalg.norm(g, axis=1, keepdims=True)
    out: npt.NDArray[np.float64] = g / norms
    return out


@dataclass(frozen=True)
class CanarySpec:
    """Which canaries exist, which client holds each, and which are in (picklable data).

    Attributes:
        seed: Seed of the canaries' random directions (:func:`canary_directions`).
        dimension: Number of trainable model parameters.
        holders: Per canary, the partition id of the client whose data holds its row.
        inclusion: Per canary, whether its row carries its gradient (``True``) or is a
            null row (``False``, left out).
        coordinates: Dirac canaries: canary ``i``'s direction is the unit vector of
            parameter ``coordinates[i]`` (distinct, so the canaries are orthogonal).
            Empty: random unit directions drawn from ``seed``.
        broken_no_noise_for_tests: TEST ONLY. The holders' DP-SGD optimizer adds no
            noise, while sigma is still calibrated and the budget claimed (the ledger
            records the calibrated sigma). It exists to show that the audit catches a
            broken mechanism; only :func:`sepals.simulations.audit.run_audit`'s private
            keyword sets it. Every client of an audited run gets a spec (possibly with
            no canary of its own) so that the switch reaches all of them.

    """

    seed: int
    dimension: int
    holders: tuple[int, ...]
    inclusion: tuple[bool, ...]
    coordinates: tuple[int, ...] = ()
    broken_no_noise_for_tests: bool = False

    def __post_init__(self) -> None:
        if self.dimension < 1:
            raise ValueError(f"dimension must be >= 1, got {self.dimension}")
        if not self.holders:
            raise ValueError("a canary spec needs at least one canary")
        if any(h < 0 for h in self.holders):
            raise ValueError("a canary's holder is a partition id >= 0")
        if len(self.inclusion) != len(self.holders):
            raise ValueError("a canary spec needs one inclusion flag per canary")
        if self.coordinates:
            if len(self.coordinates) != len(self.holders):
                raise ValueError("Dirac canaries need one coordinate per canary")
            if len(set(self.coordinates)) != len(self.coordinates) or not all(
                0 <= c < self.dimension for c in self.coordinates
            ):
                raise ValueError(f"coordinates must be distinct and in [0, {self.dimension})")

    def directions(self) -> npt.NDArray[np.float64]:
        """Every canary's unit direction (rows): ``e_c`` per coordinate, else random."""
        if not self.coordinates:
            return canary_directions(self.seed, self.count, self.dimension)
        dirs = np.zeros((self.count, self.dimension))
        dirs[np.arange(self.count), list(self.coordinates)] = 1.0
        return dirs

    @property
    def count(self) -> int:
        """Number of canaries (in and out)."""
        return len(self.holders)

    def included(self) -> npt.NDArray[np.bool_]:
        """Per canary, whether its gradient was put into training."""
        return np.asarray(self.inclusion, dtype=bool)

    def for_client(self, pid: int) -> ClientCanaries:
        """The canary rows client ``pid`` holds (possibly none)."""
        ids = tuple(i for i, h in enumerate(self.holders) if h == pid)
        dirs = self.directions()[list(ids)]
        live = self.included()[list(ids)]
        return ClientCanaries(ids, dirs * live[:, None], self.broken_no_noise_for_tests)

    def per_client(self, clients: int) -> list[int]:
        """How many canary rows each of ``clients`` clients holds."""
        counts = [0] * clients
        for h in self.holders:
            if h >= clients:
                raise ValueError(f"canary holder {h} is not one of {clients} clients")
            counts[h] += 1
        return counts


@dataclass(frozen=True, eq=False)
class ClientCanaries:
    """One client's canaries, and the training hook that makes them examples.

    Attributes:
        ids: Global indices of the canaries (into the spec's directions).
        directions: Per canary row, the gradient direction it injects (scaled by ``C``):
            its unit direction if it is included, zero (a null row) if it is left out,
            in the flat parameter order of :func:`sepals.common.models.get_flat`.
        no_noise: TEST ONLY (see :class:`CanarySpec`): remove the DP noise.

    """

    ids: tuple[int, ...]
    directions: npt.NDArray[np.float64] = field(repr=False)
    no_noise: bool = False
    _sampled: list[int] = field(default_factory=list, repr=False)

    def add_rows(self, data: Dataset[Any]) -> CanaryData:
        """``data`` with one marked row per canary appended (zero features, label ``-(1+j)``).

        ``data`` is a ``TensorDataset`` of ``(x, y)`` or any dataset of ``(x, y)``
        pairs (stacked into tensors).

        Raises:
            ValueError: ``data`` is not ``(x, y)`` pairs with non-negative integer labels.

        """
        x, y = markable_pairs(data)
        k = len(self.ids)
        cx = torch.zeros((k, *x.shape[1:]), dtype=x.dtype)
        cy = -torch.arange(1, k + 1, dtype=y.dtype)
        return CanaryData(torch.cat([x, cx]), torch.cat([y, cy]), canaries=self)

    def strip(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch without its canary rows; remembers which canaries it sampled."""
        marked = y < 0
        self._sampled.clear()
        if not bool(marked.any()):
            return x, y
        self._sampled.extend(int(j) for j in (-y[marked] - 1).tolist())
        keep = ~marked
        return x[keep], y[keep]

    def inject(self, model: torch.nn.Module, optimizer: Any, max_grad_norm: float) -> None:
        """Append ``C * u`` per sampled canary to every parameter's ``grad_sample``.

        Called after ``loss.backward()`` and before ``optimizer.step()``; the optimizer
        then clips, sums and noises the rows with the batch's real ones.

        Raises:
            ValueError: the model has no per-sample gradients (ghost clipping, or no DP).

        """
        if self.no_noise and not getattr(optimizer, "_sepals_no_noise", False):
            optimizer.add_noise = types.MethodType(_add_no_noise, optimizer)
            optimizer._sepals_no_noise = True
        if not self._sampled:
            return
        rows = torch.as_tensor(max_grad_norm * self.directions[self._sampled], dtype=torch.float32)
        offset = 0
        for p in (p for p in model.parameters() if p.requires_grad):
            grad_sample = getattr(p, "grad_sample", None)
            if not isinstance(grad_sample, torch.Tensor):
                raise ValueError(
                    "gradient canaries need Opacus per-sample gradients (DP on, "
                    "grad_sample_mode hooks, functorch or ew)"
                )
            n = p.numel()
            part = rows[:, offset : offset + n].reshape(len(self._sampled), *p.shape)
            setattr(p, "grad_sample", torch.cat([grad_sample, part.to(grad_sample)]))  # noqa: B010
            offset += n
        self._sampled.clear()


class CanaryData(TensorDataset):
    """Training data that holds gradient canaries: the rows, then one marked row per canary.

    It batches like a ``TensorDataset``; :attr:`canaries` is the hook DP-SGD runs on
    each batch (:meth:`ClientCanaries.strip` and :meth:`ClientCanaries.inject`).
    """

    def __init__(self, *tensors: torch.Tensor, canaries: ClientCanaries) -> None:
        super().__init__(*tensors)
        self.canaries = canaries


def markable_pairs(data: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``data``'s ``(x, y)`` tensors, if canary rows can be marked in them.

    A canary row is marked by its label (``-(1+j)``), so every example needs exactly one
    non-negative integer class label.

    Raises:
        ValueError: not ``(x, y)`` pairs, or targets that are not one class label per
            example (a language model's token sequences, a regression's values).

    """
    x, y = _pair_tensors(data)
    if y.dim() != 1:
        raise ValueError(
            f"canaries need one class label per example; this app's targets have shape "
            f"{tuple(y.shape)} (token sequences or several outputs cannot be marked), so "
            "it cannot be audited"
        )
    if y.dtype not in (torch.int64, torch.int32) or (len(y) and int(y.min()) < 0):
        raise ValueError("canaries need non-negative integer labels")
    return x, y


def _pair_tensors(data: Dataset[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(x, y)`` tensors of ``data``: its own, or its pairs stacked."""
    if type(data) is TensorDataset:
        tensors = data.tensors
    else:
        rows = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        if not all(isinstance(r, tuple | list) and len(r) == 2 for r in rows):
            tensors = ()
        else:
            tensors = tuple(torch.stack([torch.as_tensor(r[j]) for r in rows]) for j in (0, 1))
    if len(tensors) != 2:
        raise ValueError(
            "canaries need training data of (x, y) pairs: a TensorDataset of two tensors "
            "or a dataset of pairs"
        )
    return tensors[0], tensors[1]


def _add_no_noise(self: Any) -> None:
    """TEST ONLY: Opacus's ``DPOptimizer.add_noise`` without the noise (a broken mechanism)."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    for p in self.params:
        _check_processed_flag(p.summed_grad)
        p.grad = p.summed_grad.view_as(p).clone()
        _mark_as_processed(p.summed_grad)
