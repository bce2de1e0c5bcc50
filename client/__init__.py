"""The sepals client: DP-SGD training core, privacy ledger and Flower ClientApp."""

from sepals.client.core import ClientRuntime, SepalsClient
from sepals.client.privacy import PrivacyLedger

__all__ = ["ClientRuntime", "PrivacyLedger", "SepalsClient"]
