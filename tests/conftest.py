from __future__ import annotations

import os

import pytest

# Tests never talk to the network: no Flower telemetry, no hub.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ckks_keys() -> tuple[bytes, bytes]:
    from sepals.common.config import EncryptionConfig
    from sepals.common.scheme import generate_secret_context, public_context_bytes

    secret = generate_secret_context(EncryptionConfig(scheme="ckks"))
    return secret, public_context_bytes(secret)


@pytest.fixture(scope="session")
def bfv_keys() -> tuple[bytes, bytes]:
    from sepals.common.config import EncryptionConfig
    from sepals.common.scheme import generate_secret_context, public_context_bytes

    secret = generate_secret_context(EncryptionConfig())
    return secret, public_context_bytes(secret)


@pytest.fixture
def run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps messages with the run id of the running app; give them one."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files that hold end-to-end (``slow``) tests first, each file's tests together.

    Under ``pytest-xdist``'s ``loadfile`` distribution the workers take whole files in
    this order, so the long end-to-end files start at once, side by side, and the many
    short tests fill in behind them instead of one long file finishing alone at the end.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: files stay whole
