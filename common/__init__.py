"""Shared building blocks of sepals: configuration, HE codec, models, data and errors.

Nothing in this package knows about :mod:`sepals.server` or :mod:`sepals.client`.
"""

from sepals.common.config import EncryptionConfig, FederationConfig, PrivacyConfig
from sepals.common.errors import (
    BudgetExhaustedError,
    ForeignKeyError,
    MalformedPayloadError,
    NonFiniteUpdateError,
    SecretKeyExposureError,
    SepalsError,
)

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
