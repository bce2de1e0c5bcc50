"""``server.toml``: the operator's configuration of a deployed sepals server.

:class:`ServerDeployConfig` parses and checks the file; relative paths are resolved
against the file's directory. Every problem is a :class:`ValueError` whose message names
the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sepals.common.codec import UpdateCodec, make_server_codec
from sepals.common.config import EncryptionConfig, FederationConfig

_SERVER_KEYS = {
    "address",
    "state_dir",
    "ca_cert",
    "server_cert",
    "server_key",
    "public_context",
    "nodes_dir",
    "node_wait_timeout",
    "min_available_clients",
}


def _resolve(base: Path, value: object, key: str) -> Path | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"[server] {key} must be a path string, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"[{name}] must be a table")
    return value


def _dataclass_kwargs(cls: type, table: dict[str, Any], name: str) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(
            f"unknown key(s) in [{name}]: {', '.join(unknown)}; known: {sorted(known)}"
        )
    out = dict(table)
    if "coeff_mod_bit_sizes" in out:
        out["coeff_mod_bit_sizes"] = tuple(out["coeff_mod_bit_sizes"])
    return out


@dataclass(frozen=True)
class ServerDeployConfig:
    """The contents of ``server.toml``.

    Attributes:
        source: The file this was read from.
        address: ``host:port`` the SuperLink listens on (all its APIs share the port).
        state_dir: Metrics, checkpoints, the SuperLink database and logs.
        ca_cert: TLS CA certificate.
        server_cert: TLS server certificate (its SAN must name the host clients dial).
        server_key: TLS server private key.
        public_context: The public HE context (a secret one is refused).
        nodes_dir: Directory of node public keys (``*.pub``) to register.
        node_wait_timeout: Seconds each round waits for ``min_available_clients`` nodes.
        min_available_clients: Nodes to wait for before sampling (default: the
            federation's ``min_train_clients``); sampling then proceeds with whoever is
            connected, if at least ``min_train_clients``.
        federation: Rounds, sampling, timeout and local-training settings.
        encryption: HE settings; must match the provisioned keys.
        parameters: Parameter count of the federation's model.

    """

    source: Path
    address: str
    state_dir: Path
    ca_cert: Path | None
    server_cert: Path | None
    server_key: Path | None
    public_context: Path | None
    nodes_dir: Path | None
    node_wait_timeout: float
    min_available_clients: int
    federation: FederationConfig
    encryption: EncryptionConfig
    parameters: int

    @classmethod
    def from_toml(cls, path: Path) -> ServerDeployConfig:
        """Parse and check ``path``; relative paths are relative to its directory.

        Raises:
            ValueError: a key is unknown, missing or out of range (the message names it).

        """
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from exc
        unknown = sorted(set(raw) - {"server", "federation", "encryption", "model"})
        if unknown:
            raise ValueError(f"unknown table(s) in {path}: {', '.join(unknown)}")
        base = path.resolve().parent
        server = _table(raw, "server")
        bad = sorted(set(server) - _SERVER_KEYS)
        if bad:
            raise ValueError(f"unknown key(s) in [server]: {', '.join(bad)}")
        address = str(server.get("address", "0.0.0.0:9092"))
        split_address(address)
        state = _resolve(base, server.get("state_dir", "state"), "state_dir")
        model = _table(raw, "model")
        if set(model) - {"parameters"}:
            raise ValueError("[model] takes only 'parameters'")
        parameters = model.get("parameters")
        if not isinstance(parameters, int) or parameters < 1:
            raise ValueError(
                f"[model] parameters must be the model's parameter count (>= 1), got {parameters!r}"
            )
        wait = float(server.get("node_wait_timeout", 300.0))
        if wait <= 0:
            raise ValueError(f"[server] node_wait_timeout must be > 0, got {wait}")
        federation = FederationConfig(
            **_dataclass_kwargs(FederationConfig, _table(raw, "federation"), "federation")
        )
        available = server.get("min_available_clients", federation.min_train_clients)
        if not isinstance(available, int) or available < 1:
            raise ValueError(f"[server] min_available_clients must be >= 1, got {available!r}")
        return cls(
            source=path.resolve(),
            address=address,
            state_dir=state if state is not None else base / "state",
            ca_cert=_resolve(base, server.get("ca_cert"), "ca_cert"),
            server_cert=_resolve(base, server.get("server_cert"), "server_cert"),
            server_key=_resolve(base, server.get("server_key"), "server_key"),
            public_context=_resolve(base, server.get("public_context"), "public_context"),
            nodes_dir=_resolve(base, server.get("nodes_dir"), "nodes_dir"),
            node_wait_timeout=wait,
            min_available_clients=available,
            federation=federation,
            encryption=EncryptionConfig(
                **_dataclass_kwargs(EncryptionConfig, _table(raw, "encryption"), "encryption")
            ),
            parameters=parameters,
        )

    def codec(self) -> UpdateCodec:
        """The server codec; refuses a secret HE context.

        Raises:
            SecretKeyExposureError: the configured context holds a secret key.
            ValueError: encryption is on but no public context is configured.

        """
        public = None
        if self.encryption.scheme != "none":
            if self.public_context is None:
                raise ValueError("[server] public_context is required when encryption is on")
            try:
                public = self.public_context.read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read public_context: {exc}") from exc
        return make_server_codec(self.encryption, public)

    def node_keys(self) -> list[Path]:
        """The node public keys to register."""
        if self.nodes_dir is None:
            return []
        return sorted(self.nodes_dir.glob("*.pub"))


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of a ``HOST:PORT`` address; brackets of IPv6 hosts are removed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"[server] address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)
