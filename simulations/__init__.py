"""Local multi-client simulations (``sepals-sim``) on Flower's Ray backend.

:func:`simulate` runs your own :class:`~sepals.client.EdgeApp` from Python (see
:mod:`sepals.simulations.api`).
"""

from typing import Any

__all__ = ["SimulationResult", "simulate"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import sepals.simulations.cli`` stays light until it runs.
    if name in __all__:
        from sepals.simulations import api

        return getattr(api, name)
    raise AttributeError(f"module 'sepals.simulations' has no attribute {name!r}")
