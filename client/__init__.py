"""The sepals client: DP-SGD training core, privacy ledger, Flower ClientApp and edge SDK."""

from sepals.client.core import ClientRuntime, SepalsClient
from sepals.client.edge import (
    ClientBundle,
    EdgeClient,
    FederationConnectionError,
    NodeRefusedError,
    ServerUnreachableError,
    join_federation,
)
from sepals.client.edge_app import EdgeApp
from sepals.client.privacy import PrivacyLedger

__all__ = [
    "ClientBundle",
    "ClientRuntime",
    "EdgeApp",
    "EdgeClient",
    "FederationConnectionError",
    "NodeRefusedError",
    "PrivacyLedger",
    "SepalsClient",
    "ServerUnreachableError",
    "join_federation",
]
