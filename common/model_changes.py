"""What a federation's model owes to sepals: replaced layers and a checkpoint's share.

Two things make the model a federation trains differ from what the app's
``model_factory`` returns, and both are announced (the start line, ``report.json``, the
saved model) rather than done silently:

* **Layers replaced for DP-SGD.** Without a checkpoint, a layer DP-SGD cannot train
  (BatchNorm mixes the examples of a batch) is replaced as Opacus'
  ``ModuleValidator.fix`` does (BatchNorm becomes GroupNorm). The saved ``state_dict``
  is the fixed model's, so it loads into ``ModuleValidator.fix(Net())``, not ``Net()``:
  :func:`dp_replacements` names the replaced layers.
* **What a checkpoint supplied.** A checkpoint file sets the model parameters it holds;
  the rest keep a seeded initialisation. :class:`CheckpointCoverage` counts both, and
  :class:`FineTunedFactory` refuses a checkpoint that supplies none of the parameters
  that stay frozen (an empty ``{}`` checkpoint would train a head on a random backbone
  labelled "pretrained").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sepals.common.errors import ModelCompatibilityError
from sepals.common.finetune import (
    TrainableSpec,
    checkpoint_tensors,
    pretrained_factory,
    select_trainable,
)

# The saved model's own note on how it was built: a state_dict's ``_metadata`` entry
# that no module prefix can take (module names hold no ':').
SAVED_MODEL_NOTE = "sepals:model"


def replaced_layers(original: nn.Module, fixed: nn.Module) -> tuple[str, ...]:
    """``"name: Before -> After"`` for every module of ``original`` whose type ``fixed`` changed."""
    after = dict(fixed.named_modules())
    changes = []
    for name, module in original.named_modules():
        new = after.get(name)
        if new is not None and type(new) is not type(module):
            changes.append(f"{name or '(model)'}: {type(module).__name__} -> {type(new).__name__}")
    return tuple(changes)


def dp_replacements(factory: Callable[[], nn.Module]) -> tuple[str, ...]:
    """The layers that DP-SGD's automatic fix replaces in ``factory``'s model (none: ``()``).

    The fix is Opacus' ``ModuleValidator.fix``, as
    :func:`sepals.client.training.make_dp_compatible` applies it.
    """
    from opacus.validators import ModuleValidator

    model = factory()
    if ModuleValidator.is_valid(model):
        return ()
    return replaced_layers(model, ModuleValidator.fix(model))


def describe_replacements(changes: tuple[str, ...] | list[str]) -> str:
    """One phrase for the start line: ``BatchNorm2d -> GroupNorm at bn1, bn2``."""
    kinds: dict[str, list[str]] = {}
    for change in changes:
        name, _, kind = change.partition(": ")
        kinds.setdefault(kind, []).append(name)
    return "; ".join(f"{kind} at {', '.join(names)}" for kind, names in kinds.items())


def rebuild_hint(changes: tuple[str, ...] | list[str]) -> str:
    """How to rebuild a saved model whose layers were replaced (``""``: none were)."""
    if not changes:
        return ""
    return (
        "model.pt holds the DP-compatible model: load it into "
        "opacus.validators.ModuleValidator.fix(YourModel()) or with "
        "sepals.load_model(path, app), not into YourModel()"
    )


@dataclass(frozen=True)
class CheckpointCoverage:
    """How many of a model's parameter values a checkpoint file supplied.

    Attributes:
        supplied: Parameter values the checkpoint set.
        total: All parameter values of the model (trainable part included).
        frozen_supplied: Frozen parameter values the checkpoint set.
        frozen: All frozen parameter values.

    """

    supplied: int
    total: int
    frozen_supplied: int
    frozen: int

    def to_dict(self) -> dict[str, int]:
        """JSON-ready counts."""
        return {
            "supplied": self.supplied,
            "total": self.total,
            "frozen_supplied": self.frozen_supplied,
            "frozen": self.frozen,
        }

    def text(self) -> str:
        """``checkpoint supplies 20,394 of 21,684 parameters (20,394 of 20,394 frozen)``."""
        return (
            f"checkpoint supplies {self.supplied:,} of {self.total:,} parameters "
            f"({self.frozen_supplied:,} of {self.frozen:,} frozen)"
        )

    def check(self, name: str) -> None:
        """Refuse a checkpoint that supplies nothing, or none of the frozen parameters.

        Raises:
            ModelCompatibilityError: one line naming the checkpoint and the counts.

        """
        if self.supplied == 0:
            what = f"none of the model's {self.total:,} parameters"
        elif self.frozen and self.frozen_supplied == 0:
            what = (
                f"{self.supplied:,} of the model's {self.total:,} parameters but none of its "
                f"{self.frozen:,} frozen ones"
            )
        else:
            return
        raise ModelCompatibilityError(
            f"pretrained checkpoint {name} supplies {what}: they would stay at their random "
            "initialisation; save the pretrained model's state_dict "
            "(torch.save(model.state_dict(), path)) under the names the model_factory's "
            "model uses"
        )


def coverage_of(model: nn.Module, supplied: set[int]) -> CheckpointCoverage:
    """Count ``model``'s parameters, and those among them whose ``id`` is in ``supplied``."""
    params = list(model.parameters())
    return CheckpointCoverage(
        supplied=sum(p.numel() for p in params if id(p) in supplied),
        total=sum(p.numel() for p in params),
        frozen_supplied=sum(p.numel() for p in params if id(p) in supplied and not p.requires_grad),
        frozen=sum(p.numel() for p in params if not p.requires_grad),
    )


class FineTunedFactory:
    """Builds a pretrained model with its trainable part selected; checks what was supplied.

    Every party builds the federation's model from a checkpoint with this factory
    (:func:`sepals.client.training.model_builder`): the checkpoint loaded into
    ``factory()`` (:func:`sepals.common.finetune.pretrained_factory`), then
    ``trainable`` selected. A checkpoint file must supply some of the parameters that
    stay frozen (or any at all, when everything trains); a directory is the factory's
    to load, and is not counted. After a build, :attr:`coverage` holds the counts.

    Raises:
        ValueError: the checkpoint does not exist (at construction).
        ModelCompatibilityError: (when called) the checkpoint does not fit, or supplies
            none of the frozen parameters.

    """

    def __init__(
        self,
        factory: Callable[..., nn.Module],
        pretrained: str | os.PathLike[str],
        trainable: TrainableSpec,
    ) -> None:
        self.path = Path(pretrained).expanduser().resolve()
        self.trainable = trainable
        self._base = pretrained_factory(factory, self.path)
        self.coverage: CheckpointCoverage | None = None

    def __call__(self) -> nn.Module:
        """Build the model (see the class)."""
        model = self._base()
        supplied: set[int] = set()
        if self.path.is_file():
            names = set(checkpoint_tensors(self.path))
            supplied = {id(p) for name, p in model.named_parameters() if name in names}
        if self.trainable is not None:
            model = select_trainable(model, self.trainable)
        if self.path.is_file():
            coverage = coverage_of(model, supplied)
            coverage.check(self.path.name)
            self.coverage = coverage
        return model
