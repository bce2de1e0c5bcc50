"""Shared building blocks of sepals: configuration, HE codec, models, data and errors.

Nothing in this package knows about :mod:`sepals.server` or :mod:`sepals.client`.
"""

from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.errors import (
    BudgetExhaustedError,
    ForeignKeyError,
    MalformedPayloadError,
    NonFiniteUpdateError,
    SecretKeyExposureError,
    SepalsError,
)
from sepals.common.federation import FederationConfig

__all__ = [
    "BudgetExhaustedError",
    "EncryptionConfig",
    "FederationConfig",
    "ForeignKeyError",
    "MalformedPayloadError",
    "NonFiniteUpdateError",
    "PrivacyConfig",
    "SecretKeyExposureError",
    "SepalsError",
]
