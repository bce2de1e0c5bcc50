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
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sepals.client.privacy import PrivacyLedger, poisson_schedule
from sepals.common.config import PrivacyConfig
from sepals.common.errors import ModelCompatibilityError
from sepals.common.models import ModelFactory, get_flat, set_flat

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class TrainSettings:
    """Local training settings of one round.

    Attributes:
        epochs: Local epochs.
        batch_size: Batch size (expected batch size under Poisson sampling).
        learning_rate: SGD learning rate.
        momentum: SGD momentum.
        data_seed: Seed of batch order and Poisson sampling.
        noise_seed: Seed of the DP noise. ``None`` (the default, and the only safe choice
            outside simulations) draws a fresh seed from ``os.urandom``.
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
    data_seed: int = 0
    noise_seed: int | None = None
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


def _noise_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return gen


def _silence_opacus_notices(fn: Callable[P, R]) -> Callable[P, R]:
    """Hide two notices that are not actionable for sepals users.

    Opacus announces that ``secure_mode`` is off (documented in the README: the noise
    source is torch's generator; torchcsprng does not exist for torch 2.x), and torch
    warns about full backward hooks on input layers.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return fn(*args, **kwargs)

    return wrapper


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
) -> TrainOutcome:
    """Train one round locally and return the new weights and ledger.

    With DP on, the ledger must already be calibrated (:meth:`PrivacyLedger.calibrated`)
    and :meth:`PrivacyLedger.check_budget` must have passed for this round.

    Args:
        factory: Builds a fresh (DP-compatible) model.
        initial_weights: Flat global weights; ``None`` keeps the factory's weights.
        data: The client's training data.
        settings: Local training settings.
        privacy: The client's privacy configuration.
        ledger: The ledger before this round.
        server_round: The round number recorded in the ledger.
        poisson_sampling: Keep ``True``; ``False`` exists for equivalence tests only and
            voids the accountant's subsampling assumption.

    """
    t0 = time.perf_counter()
    model = factory()
    if initial_weights is not None:
        set_flat(model, np.asarray(initial_weights))
    model.train()
    n = len(data)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError("cannot train on an empty dataset")
    loader_gen = torch.Generator()
    loader_gen.manual_seed(settings.data_seed)
    loader = DataLoader(data, batch_size=settings.batch_size, shuffle=True, generator=loader_gen)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.learning_rate, momentum=settings.momentum
    )
    criterion = nn.CrossEntropyLoss()

    engine = None
    if privacy.enabled:
        from opacus import PrivacyEngine

        if ledger.noise_multiplier is None or ledger.sample_rate is None:
            raise ValueError("the privacy ledger must be calibrated before a DP round")
        engine = PrivacyEngine(accountant=privacy.accountant)
        if ledger.history:
            engine.accountant.load_state_dict(
                {"history": list(ledger.history), "mechanism": privacy.accountant}
            )
        wrapped = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=ledger.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=poisson_sampling,
            grad_sample_mode=settings.grad_sample_mode,
            noise_generator=_noise_generator(settings.noise_seed),
            criterion=criterion,
        )
        if len(wrapped) == 4:  # ghost clipping also wraps the loss (two backward passes)
            model, optimizer, criterion, loader = wrapped
        else:
            model, optimizer, loader = wrapped
        if poisson_sampling:
            # Poisson sampling draws from the torch global RNG unless given a generator.
            loader.batch_sampler.generator = loader_gen

    steps = 0
    loss_sum, loss_batches = 0.0, 0
    for _ in range(settings.epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss = criterion(out, y) if len(y) else out.sum() * 0.0
            loss.backward()
            optimizer.step()
            steps += 1
            if len(y):
                loss_sum += float(loss.detach())
                loss_batches += 1

    if engine is not None:
        history = tuple((float(s), float(q), int(k)) for s, q, k in engine.accountant.history)
        new_ledger = ledger.record_round(server_round, history)
        module: nn.Module = model._module  # the plain module inside GradSampleModule
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
) -> tuple[float, float, int]:
    """Mean cross-entropy loss, accuracy and example count of ``weights`` on ``data``."""
    model = factory()
    if weights is not None:
        set_flat(model, np.asarray(weights))
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=batch_size):
            out = model(x)
            loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(dim=1) == y).sum())
            count += len(y)
    if count == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    return loss_sum / count, correct / count, count


def dp_schedule(num_examples: int, settings: TrainSettings) -> tuple[float, int]:
    """Sample rate and steps per round for ``num_examples`` under ``settings``."""
    return poisson_schedule(num_examples, settings.batch_size, settings.epochs)
