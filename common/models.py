"""Reference models and flat-vector helpers.

The models avoid BatchNorm, so Opacus can compute per-sample gradients without changing
the architecture, and initialise deterministically from a seed, so every client builds
the same round-0 model without the server ever sending it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

ModelFactory = Callable[[], nn.Module]


class MLP(nn.Module):
    """A multilayer perceptron for tabular data and flattened 8x8 images.

    Args:
        in_features: Input size (inputs of any shape are flattened).
        num_classes: Number of output classes.
        hidden: Widths of the hidden layers.
        activation: ``tanh`` (the default: bounded activations train better under
            DP-SGD, see Papernot et al., "Tempered Sigmoid Activations", AAAI 2021) or
            ``relu``.

    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: tuple[int, ...] = (32,),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 2 or any(h < 1 for h in hidden):
            raise ValueError(
                f"MLP needs in_features >= 1, num_classes >= 2, hidden widths >= 1; got "
                f"{in_features}, {num_classes}, {hidden}"
            )
        if activation not in ("tanh", "relu"):
            raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
        act = nn.Tanh if activation == "tanh" else nn.ReLU
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), act()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        out: torch.Tensor = self.net(x)
        return out


class SmallCNN(nn.Module):
    """A small CNN for 1x28x28 images (about 26k parameters), GroupNorm instead of BatchNorm."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2),
            nn.GroupNorm(4, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits."""
        out: torch.Tensor = self.head(self.features(x))
        return out


def build_seeded(factory: ModelFactory, seed: int) -> nn.Module:
    """Call ``factory`` under a fixed torch seed without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def get_flat(model: nn.Module) -> npt.NDArray[np.float64]:
    """All trainable parameters as one float64 vector, in ``parameters()`` order."""
    with torch.no_grad():
        return (
            torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
            .to(torch.float64)
            .cpu()
            .numpy()
        )


def set_flat(model: nn.Module, vector: npt.NDArray[np.floating]) -> None:  # type: ignore[type-arg]
    """Load a flat vector produced by :func:`get_flat` into ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    expected = sum(p.numel() for p in params)
    if vector.shape != (expected,):
        raise ValueError(f"flat vector has shape {vector.shape}, model needs ({expected},)")
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(torch.from_numpy(np.asarray(vector[offset : offset + n])).reshape(p.shape))
            offset += n
