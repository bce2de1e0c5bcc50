"""Pretrained starting points and the choice of what a federation trains.

A federation may start from a pretrained checkpoint instead of a seeded random model,
and train only part of it: a new head on a frozen backbone, selected layers, or LoRA
adapters (through the ``peft`` library). Only trainable parameters ever move: they are
the flat vector that :func:`sepals.common.models.get_flat` returns, so they alone get
per-sample gradients, DP noise, quantization, encryption, masking and aggregation.
Frozen parameters come from the checkpoint on every party and never leave it.

Every party builds the model the same way (:func:`pretrained_factory` then
:func:`with_trainable`):

1. ``factory()`` (or ``factory(directory)`` for a checkpoint directory) under a fixed
   torch seed, so whatever the checkpoint leaves out is initialised identically on
   every party;
2. a checkpoint file is loaded as a ``state_dict``; a directory is the factory's to
   load (for example ``AutoModelForSequenceClassification.from_pretrained(path)``);
3. the trainable selection is applied under the caller's RNG, so the federation's
   model seed chooses the initial adapters or head.

The checkpoint's SHA-256 (:func:`checkpoint_sha256`) goes into the federation's plan; a
client whose local copy differs refuses to train.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import torch
from torch import nn

from sepals.common.errors import ModelCompatibilityError
from sepals.common.log import log
from sepals.common.models import ModelFactory

# The seed of every party's base model: frozen weights that a checkpoint does not set
# must still be equal everywhere.
_BASE_SEED = 0
_NAMES_SHOWN = 8


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapters (Hu et al., 2021) on the model's linear layers, through ``peft``.

    The base weights are frozen; each targeted ``nn.Linear`` gains ``lora_A`` and
    ``lora_B`` (Opacus computes their per-sample gradients as for any linear layer).

    Attributes:
        r: Adapter rank.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
        target_modules: Names (or name suffixes) of the ``nn.Linear`` modules to adapt,
            for example ``("query", "value")``.
        dropout: Dropout on the adapters' input.
        train_also: Patterns (``fnmatch``, on parameter names) of further parameters
            trained in full, for example ``("*classifier*",)`` for a new head.

    """

    r: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ()
    dropout: float = 0.0
    train_also: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoRA r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.alpha, int) or isinstance(self.alpha, bool) or self.alpha < 1:
            raise ValueError(f"LoRA alpha must be an integer >= 1, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "target_modules", _patterns("target_modules", self.target_modules))
        if not self.target_modules:
            raise ValueError("LoRA needs target_modules, e.g. ('query', 'value')")
        object.__setattr__(self, "train_also", _patterns("train_also", self.train_also))


TrainableSpec = tuple[str, ...] | LoRA | None
"""What a federation trains: ``None`` (every parameter the model leaves trainable),
parameter-name patterns (``fnmatch``, e.g. ``("head.*",)``), or :class:`LoRA`."""


def _patterns(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of strings, got {value!r}")
    items = tuple(value)
    if not all(isinstance(p, str) and p.strip() for p in items):
        raise ValueError(f"{name} must hold non-empty strings, got {value!r}")
    return items


def check_trainable(spec: object) -> TrainableSpec:
    """``spec`` as a :data:`TrainableSpec`: a list of patterns becomes a tuple.

    Raises:
        ValueError: it is neither ``None``, patterns nor :class:`LoRA`.

    """
    if spec is None or isinstance(spec, LoRA):
        return spec
    patterns = _patterns("trainable", spec)
    if not patterns:
        raise ValueError("trainable must name at least one parameter pattern (or be None)")
    return patterns


def describe_trainable(spec: TrainableSpec) -> str:
    """One line for reports: ``all``, the patterns, or the LoRA settings."""
    if spec is None:
        return "all"
    if isinstance(spec, LoRA):
        extra = f" + {','.join(spec.train_also)}" if spec.train_also else ""
        return f"lora(r={spec.r}, alpha={spec.alpha}, {','.join(spec.target_modules)}){extra}"
    return ",".join(spec)


# --------------------------------------------------------------------------- checkpoints
@functools.lru_cache(maxsize=2)
def _state_dict(path: str, size: int, mtime_ns: int) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors, read once per process while the file is unchanged."""
    del size, mtime_ns  # part of the cache key only
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file  # optional: only for this format

            return load_file(path)
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelCompatibilityError(
            f"pretrained checkpoint {path} is not a torch state_dict or safetensors file "
            f"({type(exc).__name__})"
        ) from exc
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ModelCompatibilityError(
            f"pretrained checkpoint {path} must hold a state_dict (names to tensors), as "
            "torch.save(model.state_dict(), path) writes it"
        )
    return loaded


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors by name (read once per process while it is unchanged).

    Raises:
        ModelCompatibilityError: the file is no state_dict.

    """
    stat = path.stat()
    return _state_dict(str(path), stat.st_size, stat.st_mtime_ns)


def load_checkpoint_file(model: nn.Module, path: Path) -> list[str]:
    """Load a state_dict file into ``model``; return the model's keys it left alone.

    Raises:
        ModelCompatibilityError: the file is no state_dict, holds a key the model lacks,
            or a tensor of another shape (the message names them).

    """
    stat = path.stat()
    state = _state_dict(str(path), stat.st_size, stat.st_mtime_ns)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ModelCompatibilityError(
            f"pretrained checkpoint {path.name} holds {len(unexpected)} key(s) the model "
            f"lacks: {_names(unexpected)}; build the architecture the checkpoint was saved from"
        )
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise ModelCompatibilityError(
            f"pretrained checkpoint {path.name}: {k} has shape {tuple(state[k].shape)}, the "
            f"model's is {tuple(own[k].shape)} ({len(wrong)} such key(s))"
        )
    model.load_state_dict(state, strict=False)
    return sorted(set(own) - set(state))


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _NAMES_SHOWN else "")


def _takes_path(factory: Callable[..., nn.Module]) -> bool:
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        and p.default is p.empty
        for p in params
    )


def unsupported_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, type)`` of each layer that DP-SGD cannot train per example.

    BatchNorm mixes the examples of a batch in training mode whether or not its own
    parameters are trained, so it is listed even when frozen; any other layer is listed
    when it holds trainable parameters that Opacus has no per-sample gradient for.
    """
    from opacus.validators import ModuleValidator  # heavy; needed only when validating

    found: list[tuple[str, str]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            found.append((name, type(m).__name__))
            continue
        validator = ModuleValidator.VALIDATORS.get(type(m))
        trained = any(p.requires_grad for p in m.parameters(recurse=False))
        if validator is not None and trained and validator(m):
            found.append((name, type(m).__name__))
    return found


def check_dp_layers(model: nn.Module) -> None:
    """Refuse a pretrained model that DP-SGD cannot train, naming the layer and the fix.

    Raises:
        ModelCompatibilityError: one line naming the first unsupported layer.

    """
    bad = unsupported_layers(model)
    if bad:
        name, kind = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ModelCompatibilityError(
            f"layer {name!r} ({kind}){more} cannot be trained with DP-SGD: rebuild the "
            "model with GroupNorm instead of BatchNorm (opacus.validators.ModuleValidator"
            ".fix(model)) BEFORE pretraining, and save the checkpoint of the fixed model"
        )


def pretrained_factory(
    factory: Callable[..., nn.Module], pretrained: str | os.PathLike[str]
) -> ModelFactory:
    """A factory of ``factory``'s model with the checkpoint ``pretrained`` loaded.

    A file is loaded as a ``state_dict`` into ``factory()``; for a directory (a Hugging
    Face ``save_pretrained`` folder, say) the model is ``factory(directory)``. Either
    way the build runs under a fixed seed, so parameters the checkpoint does not set are
    equal on every party. The model must already be DP-compatible
    (:func:`check_dp_layers`): fixing it here would change the pretrained layers.

    Raises:
        ValueError: the checkpoint does not exist, or a directory checkpoint is given to
            a factory that takes no path.

    """
    path = Path(pretrained).expanduser().resolve()
    if not path.exists():
        raise ValueError(f"pretrained checkpoint {path} does not exist")
    if path.is_dir() and not _takes_path(factory):
        raise ValueError(
            f"pretrained checkpoint {path} is a directory: the model factory must take its "
            "path, e.g. lambda path: AutoModelForSequenceClassification.from_pretrained(path)"
        )

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_BASE_SEED)
            if path.is_dir():
                model = factory(str(path))
            else:
                model = factory()
                left = load_checkpoint_file(model, path)
                if left:
                    log(INFO, "pretrained checkpoint sets no %s: seeded", _names(left))
        if not isinstance(model, nn.Module):
            raise ValueError(f"the model factory returned a {type(model).__name__}")
        check_dp_layers(model)
        return model

    return build


# --------------------------------------------------------------------------- trainable
def select_trainable(model: nn.Module, spec: TrainableSpec) -> nn.Module:
    """Make exactly ``spec``'s parameters trainable; return the (possibly new) model.

    Raises:
        ModelCompatibilityError: a pattern matches no parameter, LoRA targets no linear
            layer, or nothing is left to train.

    """
    if spec is None:
        pass
    elif isinstance(spec, LoRA):
        model = _inject_lora(model, spec)
    else:
        names = [n for n, _ in model.named_parameters()]
        for pattern in spec:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ModelCompatibilityError(
                    f"trainable pattern {pattern!r} matches no parameter; the model has "
                    f"{_names(names)}"
                )
        for name, p in model.named_parameters():
            p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in spec))
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelCompatibilityError("the model has no trainable parameter left")
    return model


@functools.lru_cache(maxsize=64)
def _log_once(message: str) -> None:
    log(INFO, "%s", message)


def _inject_lora(model: nn.Module, spec: LoRA) -> nn.Module:
    try:
        from peft import LoraConfig, inject_adapter_in_model  # optional dependency
    except ImportError as exc:
        raise ModelCompatibilityError(
            "LoRA needs the peft package: pip install 'sepals[transformers]'"
        ) from exc
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
    )
    for p in model.parameters():
        p.requires_grad_(False)
    # peft warns about its own adjustments (e.g. fan_in_fan_out for GPT-2's Conv1D) on
    # every build, in every client, every round: each goes to the log once instead.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = inject_adapter_in_model(config, model)
        except ValueError as exc:
            raise ModelCompatibilityError(
                f"LoRA target_modules {list(spec.target_modules)} fit no layer of the model "
                f"({str(exc).splitlines()[0][:200]})"
            ) from exc
    for warning in caught:
        _log_once(f"peft: {warning.message}")
    names = [n for n, _ in model.named_parameters()]
    for pattern in spec.train_also:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ModelCompatibilityError(
                f"LoRA train_also pattern {pattern!r} matches no parameter; the model has "
                f"{_names(names)}"
            )
    for name, p in model.named_parameters():
        p.requires_grad_(
            "lora_" in name or any(fnmatch.fnmatchcase(name, pat) for pat in spec.train_also)
        )
    return model


def with_trainable(base: ModelFactory, spec: TrainableSpec) -> ModelFactory:
    """``base``'s models with :func:`select_trainable` applied (``base`` itself if ``None``)."""
    if spec is None:
        return base
    return functools.partial(_select_built, base, spec)


def _select_built(base: ModelFactory, spec: TrainableSpec) -> nn.Module:
    return select_trainable(base(), spec)


@dataclass(frozen=True)
class ParameterCounts:
    """Trainable and total parameter counts of a model, and the trainable part's fp32 size."""

    trainable: int
    total: int

    @property
    def trainable_fp32_bytes(self) -> int:
        """Bytes of the trainable parameters as fp32: the plaintext size of one update."""
        return 4 * self.trainable

    @classmethod
    def of(cls, model: nn.Module) -> ParameterCounts:
        """Count ``model``'s parameters."""
        params = list(model.parameters())
        return cls(
            trainable=sum(p.numel() for p in params if p.requires_grad),
            total=sum(p.numel() for p in params),
        )

    def to_dict(self) -> dict[str, int]:
        """JSON-ready counts."""
        return {
            "trainable": self.trainable,
            "total": self.total,
            "trainable_fp32_bytes": self.trainable_fp32_bytes,
        }
