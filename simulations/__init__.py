"""Local multi-client simulations (``sepals-sim``) on Flower's Ray backend.

:func:`simulate` runs your own :class:`~sepals.client.EdgeApp` from Python (see
:mod:`sepals.simulations.api`).
"""

from sepals.simulations.api import SimulationResult, load_model, simulate

__all__ = ["SimulationResult", "load_model", "simulate"]
