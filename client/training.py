"""The reusable client training core: DP-SGD with Opacus, or plain SGD.

One call trains one round. The model is rebuilt from the caller's factory every round
and wrapped by a fresh :class:`opacus.PrivacyEngine`, so hooks are never added twice;
the accountant's history is carried across rounds through :class:`PrivacyLedger`.
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sepals.client.canaries import CanaryData
from sepals.client.privacy import PrivacyLedger, poisson_schedule
from sepals.client.secret_random import (
    DpRandomness,
    SecretNoise,
    secret_poisson_loader,
    use_secret_noise,
)
from sepals.common.config import PrivacyConfig
from sepals.common.errors import ModelCompatibilityError, TrainingInputError
from sepals.common.finetune import TrainableSpec, with_trainable
from sepals.common.model_changes import FineTunedFactory
from sepals.common.models import ModelFactory, get_flat, set_flat

P = ParamSpec("P")
R = TypeVar("R")

# An app's loss: ``loss_fn(output, target)`` -> a 0-dim tensor, the MEAN over the batch
# (Opacus scales per-sample gradients for ``loss_reduction="mean"``).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# An app's metric: ``metric(outputs, targets)`` over the whole evaluation set -> a float.
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device that ``device`` names: ``auto`` (or ``None``) picks CUDA if present.

    Raises:
        ValueError: ``device`` is not a device name, or names CUDA on a machine without it.

    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device here")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return resolved


def _mean_loss(loss_fn: LossFn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = loss_fn(out, y)
    # (Under ghost clipping the loss is Opacus's wrapper, not a plain tensor.)
    if type(loss) is torch.Tensor and loss.dim() != 0:
        raise TrainingInputError(
            "loss is not a batch mean",
            "loss_fn must return a 0-dim tensor: the mean loss over the batch (reduction='mean')",
        )
    return loss


@dataclass(frozen=True)
class TrainSettings:
    """Local training settings of one round.

    Attributes:
        epochs: Local epochs.
        batch_size: Batch size (expected batch size under Poisson sampling).
        learning_rate: SGD learning rate.
        momentum: SGD momentum.
        randomness: Where the round's Poisson sampling and DP noise come from: fresh
            keys from the kernel's CSPRNG by default, the only private choice
            (:class:`~sepals.client.secret_random.DpRandomness`; a seeded one is for
            tests and voids the epsilon).
        grad_sample_mode: Opacus per-sample-gradient mode. ``hooks`` (the default) and
            ``ghost`` (ghost clipping: two backward passes, no per-sample gradients in
            memory) survive the empty batches that Poisson sampling yields on small
            clients; ``functorch`` fails on them for convolutional models and ``ew``
            always. ``python -m benchmarks.dp`` measured ``hooks`` fastest for both
            model families (see the README), so it is the default for both.

    """

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.1
    momentum: float = 0.9
    randomness: DpRandomness = field(default_factory=DpRandomness)
    grad_sample_mode: str = "hooks"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}"
            )
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")


@dataclass(frozen=True)
class TrainOutcome:
    """What a round of local training produced."""

    weights: npt.NDArray[np.float64]
    num_examples: int
    steps: int
    mean_loss: float
    seconds: float
    ledger: PrivacyLedger


def make_dp_compatible(factory: ModelFactory) -> ModelFactory:
    """Wrap ``factory`` so that its models pass Opacus's validator.

    BatchNorm and other unsupported layers are replaced the way
    ``opacus.validators.ModuleValidator.fix`` does (BatchNorm becomes GroupNorm), so
    every client and the evaluator build the same fixed architecture from round 0.

    Raises:
        ModelCompatibilityError: the model has a problem that cannot be fixed.

    """

    def fixed() -> nn.Module:
        from opacus.validators import ModuleValidator

        model = factory()
        if ModuleValidator.is_valid(model):
            return model
        model = ModuleValidator.fix(model)
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ModelCompatibilityError(
                "model cannot be trained with DP-SGD even after automatic fixes: "
                + "; ".join(str(e) for e in errors)
            )
        return model

    return fixed


def model_builder(
    factory: Callable[..., nn.Module],
    pretrained: str | os.PathLike[str] | None = None,
    trainable: TrainableSpec = None,
) -> ModelFactory:
    """The factory of the model a federation trains, the same on every party.

    Without a checkpoint, ``factory``'s model is made DP-compatible automatically
    (:func:`make_dp_compatible`: nothing pretrained is lost). With one, the checkpoint is
    loaded (:func:`sepals.common.finetune.pretrained_factory`) and an unsupported layer
    is refused with the fix to apply before pretraining. Then only ``trainable``'s
    parameters are left trainable (:func:`sepals.common.finetune.select_trainable`), and
    a checkpoint that supplies none of the frozen ones is refused
    (:class:`sepals.common.model_changes.FineTunedFactory`).

    Raises:
        ValueError: the checkpoint does not exist or does not suit the factory.

    """
    if pretrained is None:
        return with_trainable(make_dp_compatible(factory), trainable)
    return FineTunedFactory(factory, pretrained, trainable)


def _silence_opacus_notices(fn: Callable[P, R]) -> Callable[P, R]:
    """Hide two notices that are not actionable for sepals users.

    Opacus announces that ``secure_mode`` is off (it needs torchcsprng, which does not
    exist for torch 2.x; sepals draws the sampling and the noise from its own CSPRNG
    instead, :mod:`sepals.client.secret_random`), and torch warns about full backward
    hooks on input layers.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return fn(*args, **kwargs)

    return wrapper


class _BatchedTensors(Dataset):  # type: ignore[type-arg]
    """A ``TensorDataset`` that hands the loader whole batches, one indexing per tensor.

    PyTorch's loader fetches a batch through ``__getitems__`` when a dataset has it and
    passes the result to ``collate_fn``; with :func:`_as_batch` as ``collate_fn`` a batch
    costs one ``tensor[indices]`` per tensor instead of one ``__getitem__`` per example
    and a stack. Which examples form a batch is still the sampler's choice (Opacus's
    Poisson sampler under DP). An empty index list gives ``[]``, which Opacus's collate
    wrapper turns into its zero-size batch, as for any dataset.
    """

    def __init__(self, data: TensorDataset) -> None:
        self.tensors = data.tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        if len(indices) == 0:
            return []
        idx = torch.as_tensor(indices, dtype=torch.long)
        return [t[idx] for t in self.tensors]


def _as_batch(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return batch


def _batched(data: Dataset) -> tuple[Dataset, Callable[[Any], Any] | None]:  # type: ignore[type-arg]
    """``data`` as the loader should index it, and the collate function that goes with it."""
    if type(data) is TensorDataset or type(data) is CanaryData:
        return _BatchedTensors(data), _as_batch
    return data, None


def make_loader(
    data: Dataset,  # type: ignore[type-arg]
    batch_size: int,
    randomness: DpRandomness,
    *,
    poisson: bool,
) -> DataLoader:  # type: ignore[type-arg]
    """The training loader; batches of a ``TensorDataset`` are fetched whole.

    ``poisson``: DP-SGD's Poisson batches from the secret sampler
    (:func:`~sepals.client.secret_random.secret_poisson_loader`); otherwise shuffled
    batches of ``batch_size`` (non-private training, and equivalence tests).
    """
    dataset, collate = _batched(data)
    if poisson:
        return secret_poisson_loader(dataset, batch_size, randomness.child("batches"), collate)
    shuffle = torch.Generator()
    shuffle.manual_seed(randomness.key("shuffle") % (1 << 63))
    if collate is None:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=shuffle)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=shuffle, collate_fn=collate
    )


def _make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: Any,
    loader: DataLoader,  # type: ignore[type-arg]
    settings: TrainSettings,
    privacy: PrivacyConfig,
    ledger: PrivacyLedger,
    poisson_sampling: bool,
) -> tuple[Any, Any, Any, Any]:
    """Wrap the round's model, optimizer and loss with a fresh Opacus ``PrivacyEngine``.

    The loader is already the secret Poisson loader, so Opacus is told not to replace
    it; the accountant still records ``(sigma, 1 / len(loader), steps)``.
    """
    from opacus import PrivacyEngine

    if ledger.noise_multiplier is None or ledger.sample_rate is None:
        raise ValueError("the privacy ledger must be calibrated before a DP round")
    # Opacus keeps the history; a ``pld`` ledger composes it itself (client.privacy).
    mechanism = "rdp" if privacy.accountant == "pld" else privacy.accountant
    engine = PrivacyEngine(accountant=mechanism)
    if ledger.history:
        engine.accountant.load_state_dict({"history": list(ledger.history), "mechanism": mechanism})
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=ledger.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        poisson_sampling=False,
        grad_sample_mode=settings.grad_sample_mode,
        criterion=criterion,
    )
    if len(wrapped) == 4:  # ghost clipping also wraps the loss (two backward passes)
        private_model, private_optimizer, criterion, _ = wrapped
    else:
        private_model, private_optimizer, _ = wrapped
    if poisson_sampling:
        # As Opacus does for its own Poisson loader: every step is one sampled batch.
        private_model.forbid_grad_accumulation()
    return engine, private_model, private_optimizer, criterion


@_silence_opacus_notices
def train_round(
    factory: ModelFactory,
    initial_weights: npt.NDArray[np.floating] | None,  # type: ignore[type-arg]
    data: Dataset,  # type: ignore[type-arg]
    settings: TrainSettings,
    privacy: PrivacyConfig,
    ledger: PrivacyLedger,
    server_round: int,
    *,
    poisson_sampling: bool = True,
    loss_fn: LossFn | None = None,
    device: str | torch.device = "cpu",
) -> TrainOutcome:
    """Train one round locally and return the new weights and ledger.

    With DP on, the ledger must already be calibrated (:meth:`PrivacyLedger.calibrated`)
    and :meth:`PrivacyLedger.check_budget` must have passed for this round.

    Args:
        factory: Builds a fresh (DP-compatible) model.
        initial_weights: Flat global weights; ``None`` keeps the factory's weights.
        data: The client's training data. A privacy audit's :class:`CanaryData` also
            holds gradient canaries, whose hook runs on every batch.
        settings: Local training settings.
        privacy: The client's privacy configuration.
        ledger: The ledger before this round.
        server_round: The round number recorded in the ledger.
        poisson_sampling: Keep ``True``; ``False`` exists for equivalence tests only and
            voids the accountant's subsampling assumption.
        loss_fn: The training loss, ``loss_fn(output, target)`` returning the batch
            MEAN as a 0-dim tensor (default: cross-entropy). DP-SGD clips per-sample
            gradients of this loss, scaled for a mean reduction.
        device: Where the model and batches live (``cpu``, ``cuda``, ``auto``). Weights
            come back on the CPU.

    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    model = factory()
    if initial_weights is not None:
        set_flat(model, np.asarray(initial_weights))
    model.to(dev)
    model.train()
    n = len(data)  # type: ignore[arg-type]
    if n < 1:
        raise TrainingInputError("no training data", "cannot train on an empty dataset")
    canaries = data.canaries if isinstance(data, CanaryData) else None
    private = privacy.enabled
    loader = make_loader(
        data, settings.batch_size, settings.randomness, poisson=private and poisson_sampling
    )
    # Frozen (pretrained) parameters take no part in the step: no gradient, no noise.
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=settings.learning_rate,
        momentum=settings.momentum,
    )
    criterion: Any = nn.CrossEntropyLoss() if loss_fn is None else loss_fn

    engine = None
    noise: SecretNoise | None = None
    if private:
        engine, model, optimizer, criterion = _make_private(
            model, optimizer, criterion, loader, settings, privacy, ledger, poisson_sampling
        )
        noise = SecretNoise(
            settings.randomness.child("noise"),
            sum(p.numel() for p in optimizer.params),
            float(optimizer.noise_multiplier) * privacy.max_grad_norm,
            len(loader) * settings.epochs,
        )
        use_secret_noise(optimizer, noise)

    steps = 0
    loss_sum, loss_batches = 0.0, 0
    try:
        for _ in range(settings.epochs):
            for x_batch, y_batch in loader:
                if canaries is not None:
                    x_batch, y_batch = canaries.strip(x_batch, y_batch)
                x, y = x_batch.to(dev), y_batch.to(dev)
                optimizer.zero_grad(set_to_none=True)
                out = model(x)
                loss = _mean_loss(criterion, out, y) if len(y) else out.sum() * 0.0
                loss.backward()
                if canaries is not None:
                    canaries.inject(model, optimizer, privacy.max_grad_norm)
                optimizer.step()
                steps += 1
                if len(y):
                    loss_sum += float(loss.detach())
                    loss_batches += 1
    finally:
        if noise is not None:
            noise.close()

    if engine is not None:
        history = tuple((float(s), float(q), int(k)) for s, q, k in engine.accountant.history)
        new_ledger = ledger.record_round(server_round, history)
        inner = model._module  # the plain module inside GradSampleModule
        if not isinstance(inner, nn.Module):
            raise TypeError(f"GradSampleModule wraps a {type(inner).__name__}, not a module")
        module: nn.Module = inner
    else:
        new_ledger = ledger.record_plain_round(server_round)
        module = model
    return TrainOutcome(
        weights=get_flat(module),
        num_examples=n,
        steps=steps,
        mean_loss=loss_sum / max(loss_batches, 1),
        seconds=time.perf_counter() - t0,
        ledger=new_ledger,
    )


def evaluate_model(
    factory: ModelFactory,
    weights: npt.NDArray[np.floating] | None,  # type: ignore[type-arg]
    data: Dataset,  # type: ignore[type-arg]
    batch_size: int = 256,
    *,
    loss_fn: LossFn | None = None,
    metric: MetricFn | None = None,
    device: str | torch.device = "cpu",
) -> tuple[float, float, int]:
    """Mean loss, metric and example count of ``weights`` on ``data``.

    The defaults are cross-entropy and accuracy. A custom ``loss_fn`` (batch mean) is
    averaged over the examples; a custom ``metric`` sees every output and target at
    once, on the CPU.
    """
    dev = resolve_device(device)
    model = factory()
    if weights is not None:
        set_flat(model, np.asarray(weights))
    model.to(dev)
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    outputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    with torch.no_grad():
        for x_batch, y_batch in DataLoader(data, batch_size=batch_size):
            x, y = x_batch.to(dev), y_batch.to(dev)
            out = model(x)
            if loss_fn is None:
                loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            else:
                loss_sum += float(_mean_loss(loss_fn, out, y)) * len(y)
            if metric is None:
                correct += int((out.argmax(dim=1) == y).sum())
            else:
                outputs.append(out.cpu())
                targets.append(y.cpu())
            count += len(y)
    if count == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    if metric is None:
        return loss_sum / count, correct / count, count
    value = float(metric(torch.cat(outputs), torch.cat(targets)))
    return loss_sum / count, value, count


def dp_schedule(num_examples: int, settings: TrainSettings) -> tuple[float, int]:
    """Sample rate and steps per round for ``num_examples`` under ``settings``."""
    return poisson_schedule(num_examples, settings.batch_size, settings.epochs)
