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
