"""The sepals server: encrypted-aggregation strategy and Flower ServerApp."""

from sepals.server.app import ServerSettings, build_strategy, make_server_app
from sepals.server.strategy import EncryptedFedAvg, RoundRecord

__all__ = ["EncryptedFedAvg", "RoundRecord", "ServerSettings", "build_strategy", "make_server_app"]
