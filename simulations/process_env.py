"""Process environment defaults of every sepals simulation process.

Flower sends anonymous usage telemetry unless told not to, and a privacy product does
not; the Hugging Face hub stays offline (nothing is downloaded at run time), and
Hugging Face libraries keep their loading bars and advisory warnings to themselves
(every client would print them every round); glibc's allocator is tuned for Opacus'
many short-lived per-sample gradient tensors.
"""

from __future__ import annotations

import os
import sys

from sepals.common.log import QUIET_LIBRARY_ENV

# Flower sends anonymous usage telemetry unless told not to. A privacy product does not.
PROCESS_ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    **QUIET_LIBRARY_ENV,
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # glibc malloc tuning: Opacus allocates many short-lived per-sample gradient
    # tensors; without this DP-SGD runs about 2x slower (see the design brief).
    "MALLOC_MMAP_THRESHOLD_": "1048576",
    "MALLOC_TRIM_THRESHOLD_": "268435456",
}


# Flower reads its telemetry switch once, into this module's FLWR_TELEMETRY_ENABLED, when
# the module is first imported (a Flower internal: docs/flower-internals.md).
_FLOWER_TELEMETRY = "flwr.supercore.telemetry"


def apply_process_env() -> None:
    """Set sepals' environment defaults (telemetry off, offline hub) unless already set.

    The child processes of the run inherit them. In this process, Flower may have read
    its telemetry switch already (any import of Flower does); the switch is then set
    from the environment too, so the order of imports cannot turn telemetry on.
    """
    for key, value in PROCESS_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    telemetry = sys.modules.get(_FLOWER_TELEMETRY)
    if telemetry is not None:
        switch = os.environ["FLWR_TELEMETRY_ENABLED"]
        telemetry.FLWR_TELEMETRY_ENABLED = switch  # type: ignore[attr-defined]
