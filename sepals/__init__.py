"""Sepals: privacy-preserving federated learning (Flower, Opacus DP-SGD, BFV encryption).

The public API is the names in ``__all__``; everything under ``sepals.common``,
``sepals.client``, ``sepals.server`` and ``sepals.simulations`` that is not re-exported
here is internal and may change. See ``docs/api.md``.

* describe a client: :class:`EdgeApp` (its model, data, privacy budget; optionally a
  pretrained checkpoint and what to train: name globs or :class:`LoRA`);
* simulate many of them on one machine or a Ray cluster: :func:`simulate`; rebuild a
  run's saved model: :func:`load_model`;
* join a deployed federation from your own process: :func:`join_federation`;
* explain a model's predictions on the device, sending nothing: :func:`explain`;
* settings: :class:`PrivacyConfig`, :class:`EncryptionConfig`, :class:`FederationConfig`;
* errors: every sepals error is a :class:`SepalsError`.

Names resolve on first use, so ``import sepals.server`` (an operator's process) does not
load the client SDK or the simulator.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sepals.client.connect import (
        FederationConnectionError,
        NodeRefusedError,
        ServerUnreachableError,
    )
    from sepals.client.edge import EdgeClient, join_federation
    from sepals.client.edge_app import EdgeApp
    from sepals.client.explain_local import Explanation, explain
    from sepals.common.config import EncryptionConfig, PrivacyConfig
    from sepals.common.errors import (
        BudgetExhaustedError,
        ModelCompatibilityError,
        PayloadError,
        SepalsError,
    )
    from sepals.common.federation import FederationConfig
    from sepals.common.finetune import LoRA
    from sepals.common.plan import PlanViolationError
    from sepals.simulations.api import SimulationResult, load_model, simulate

# Public name -> the module that defines it.
_HOMES = {
    "EdgeApp": "sepals.client.edge",
    "EdgeClient": "sepals.client.edge",
    "join_federation": "sepals.client.edge",
    "explain": "sepals.client.explain_local",
    "Explanation": "sepals.client.explain_local",
    "simulate": "sepals.simulations.api",
    "SimulationResult": "sepals.simulations.api",
    "load_model": "sepals.simulations.api",
    "PrivacyConfig": "sepals.common.config",
    "EncryptionConfig": "sepals.common.config",
    "FederationConfig": "sepals.common.federation",
    "LoRA": "sepals.common.finetune",
    "SepalsError": "sepals.common.errors",
    "BudgetExhaustedError": "sepals.common.errors",
    "ModelCompatibilityError": "sepals.common.errors",
    "PayloadError": "sepals.common.errors",
    "PlanViolationError": "sepals.common.plan",
    "FederationConnectionError": "sepals.client.connect",
    "NodeRefusedError": "sepals.client.connect",
    "ServerUnreachableError": "sepals.client.connect",
}

__all__ = [
    "BudgetExhaustedError",
    "EdgeApp",
    "EdgeClient",
    "EncryptionConfig",
    "Explanation",
    "FederationConfig",
    "FederationConnectionError",
    "LoRA",
    "ModelCompatibilityError",
    "NodeRefusedError",
    "PayloadError",
    "PlanViolationError",
    "PrivacyConfig",
    "SepalsError",
    "ServerUnreachableError",
    "SimulationResult",
    "explain",
    "join_federation",
    "load_model",
    "simulate",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'sepals' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return sorted(__all__)
