"""``server.toml``: the operator's configuration of a deployed sepals server.

:class:`ServerDeployConfig` parses and checks the file; relative paths are resolved
against the file's directory. Every value is checked for its TOML type and its range
before a configuration object is built (TOML ``true`` is not a number, ``2.5`` is not an
integer), and every problem is a one-line :class:`ValueError` naming ``[table] key``.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sepals.common.codec import UpdateCodec
from sepals.common.config import EncryptionConfig
from sepals.common.errors import InsecureFileError, PayloadError
from sepals.common.federation import FederationConfig
from sepals.common.files import check_usable_dir, require_private
from sepals.common.round_signature import OperatorSigner
from sepals.common.seal_bundle import key_parameters
from sepals.server.control.toml_table import TomlTable, show_value
from sepals.server.front.limits import MAX_DEADLINE, FrontLimits
from sepals.server.serverapp.run_spec import DeployedRun

_TABLES = ("server", "federation", "encryption", "model", "nodes", "front")
_SERVER_KEYS = (
    "address",
    "state_dir",
    "ca_cert",
    "server_cert",
    "server_key",
    "public_context",
    "nodes_dir",
    "node_wait_timeout",
    "min_available_clients",
    "plan",
    "operator_key",
)
_FILE_KEYS = ("ca_cert", "server_cert", "server_key", "public_context", "plan", "operator_key")
_PRIVATE_KEYS = ("server_key", "operator_key")
# Longest timeout accepted (seconds): a week. Larger values overflow timers.
MAX_TIMEOUT = 7 * 24 * 3600.0
# Largest example count a cap may allow: integers above 2**53 are not exact as floats.
MAX_EXAMPLES_CAP = 2**53
DEFAULT_MAX_EXAMPLES = 10_000


def _federation(raw: Mapping[str, Any]) -> FederationConfig:
    known = [f.name for f in fields(FederationConfig)]
    t = TomlTable(raw, "federation", known)
    d = FederationConfig()
    readers: dict[str, Callable[[], object]] = {
        "rounds": lambda: t.integer("rounds", d.rounds, low=1),
        "fraction_train": lambda: t.number(
            "fraction_train", d.fraction_train, low=0.0, high=1.0, low_open=True
        ),
        "min_train_clients": lambda: t.integer("min_train_clients", d.min_train_clients, low=1),
        "fraction_evaluate": lambda: t.number(
            "fraction_evaluate", d.fraction_evaluate, low=0.0, high=1.0
        ),
        "local_epochs": lambda: t.integer("local_epochs", d.local_epochs, low=1),
        "batch_size": lambda: t.integer("batch_size", d.batch_size, low=1),
        "learning_rate": lambda: t.number(
            "learning_rate", d.learning_rate, low=0.0, high=math.inf, low_open=True
        ),
        "lr_schedule": lambda: t.string("lr_schedule", d.lr_schedule, ("cosine", "constant")),
        "momentum": lambda: t.number("momentum", d.momentum, low=0.0, high=1.0, high_open=True),
        "round_timeout": lambda: t.number(
            "round_timeout", d.round_timeout, low=0.0, high=MAX_TIMEOUT, low_open=True
        ),
        "seed": lambda: t.integer("seed", d.seed, low=0, high=2**63 - 1),
        "mask_neighbours": lambda: t.integer("mask_neighbours", d.mask_neighbours, low=0),
        "mask_threshold": lambda: t.integer("mask_threshold", d.mask_threshold, low=0),
        "noise_shares": lambda: t.integer("noise_shares", d.noise_shares, low=1),
        "weight_cap": lambda: t.integer("weight_cap", d.weight_cap, low=1, high=MAX_EXAMPLES_CAP),
    }
    # A field added to FederationConfig later without a typed reader here is passed
    # through; its dataclass then checks it.
    kwargs = {k: readers[k]() if k in readers else t.raw[k] for k in known if k in t.raw}
    try:
        return FederationConfig(**kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"[federation] {exc}") from exc


def _encryption(raw: Mapping[str, Any]) -> EncryptionConfig:
    known = [f.name for f in fields(EncryptionConfig)]
    t = TomlTable(raw, "encryption", known)
    d = EncryptionConfig()
    readers: dict[str, Callable[[], object]] = {
        "scheme": lambda: t.string("scheme", d.scheme, ("bfv", "ckks", "none")),
        "poly_modulus_degree": lambda: t.integer(
            "poly_modulus_degree", d.poly_modulus_degree, low=1
        ),
        "coeff_mod_bit_sizes": lambda: t.integers(
            "coeff_mod_bit_sizes", d.coeff_mod_bit_sizes, most=64
        ),
        "scale_bits": lambda: t.integer("scale_bits", d.scale_bits, low=1),
        "max_clients": lambda: t.integer("max_clients", d.max_clients, low=1),
        "plain_modulus_bits": lambda: t.integer("plain_modulus_bits", d.plain_modulus_bits, low=1),
        "update_bound": lambda: t.number(
            "update_bound", d.update_bound, low=0.0, high=math.inf, low_open=True
        ),
    }
    kwargs = {k: readers[k]() if k in readers else t.raw[k] for k in known if k in t.raw}
    try:
        return EncryptionConfig(**kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"[encryption] {exc}") from exc


def _front(raw: Mapping[str, Any]) -> FrontLimits:
    """``[front]``: the public front's deadlines and limits (each field of FrontLimits)."""
    known = fields(FrontLimits)
    t = TomlTable(raw, "front", [f.name for f in known])
    values: dict[str, float | int] = {}
    for f in known:
        if f.name in t.raw:
            values[f.name] = (
                t.number(f.name, f.default, low=0.0, high=MAX_DEADLINE, low_open=True)  # type: ignore[arg-type]
                if f.type == "float"
                else t.integer(f.name, f.default, low=1)  # type: ignore[arg-type]
            )
    try:
        return FrontLimits(**values)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"[front] {exc}") from exc


def _node_caps(raw: Mapping[str, Any]) -> tuple[int, dict[str, int]]:
    t = TomlTable(raw, "nodes", ("default_max_examples", "max_examples"))
    default = t.integer("default_max_examples", DEFAULT_MAX_EXAMPLES, low=1, high=MAX_EXAMPLES_CAP)
    table = t.raw.get("max_examples", {})
    if not isinstance(table, dict):
        raise ValueError(
            f"[nodes] max_examples must be a table of client name = cap, got {show_value(table)}"
        )
    per_node = TomlTable(raw, "nodes.max_examples", table)
    caps: dict[str, int] = {}
    for name in per_node.raw:
        if not name or not name.isprintable() or any(c.isspace() for c in name):
            raise ValueError(
                f"[nodes.max_examples] {name!r} is not a client name (no spaces or "
                "control characters)"
            )
        caps[name] = per_node.integer(name, default, low=1, high=MAX_EXAMPLES_CAP)
    return default, caps


def _check_server_files(
    server: TomlTable,
    paths: dict[str, Path | None],
    encryption: EncryptionConfig,
    caps: Mapping[str, int],
    insecure: bool,
) -> None:
    """Kinds of the named files, the public context's presence, the server key's mode."""
    for key in (*_FILE_KEYS, "nodes_dir"):
        path = paths[key]
        if path is None:
            if key == "public_context" and encryption.enabled:
                raise ValueError(
                    f"{server.where(key)} is required when [encryption] scheme "
                    f"is {encryption.scheme!r}"
                )
            continue
        try:
            exists = path.exists()
            if key == "nodes_dir":
                if exists and not path.is_dir():
                    raise ValueError(f"{server.where(key)} {path} is not a directory")
                if exists:
                    _check_cap_names(caps, path)
                continue
            if exists and not path.is_file():
                raise ValueError(f"{server.where(key)} {path} is not a file")
            if key == "public_context" and encryption.enabled and not exists:
                raise ValueError(f"{server.where(key)} {path} does not exist")
            if key in _PRIVATE_KEYS and exists:
                require_private(path, server.where(key), allow_insecure=insecure)
        except InsecureFileError as exc:
            raise ValueError(str(exc)) from exc
        except OSError as exc:
            raise ValueError(
                f"{server.where(key)} {path} cannot be used: {exc.strerror or exc}"
            ) from exc


def _check_cap_names(caps: Mapping[str, int], nodes_dir: Path) -> None:
    """A per-node cap must name a provisioned node (a typo would silently not apply)."""
    if not caps:
        return
    known = {p.stem for p in nodes_dir.glob("*.pub")}
    stray = sorted(set(caps) - known)
    if stray:
        raise ValueError(
            f"[nodes.max_examples] {', '.join(map(repr, stray))} names no node key in "
            f"{nodes_dir} (known: {', '.join(sorted(known)) or 'none'})"
        )


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
        plan: The federation's plan (``plan.json``), which every client holds a copy of.
        operator_key: The operator's Ed25519 key that signs every round (0600).
        node_wait_timeout: Seconds each round waits for ``min_available_clients`` nodes.
        min_available_clients: Nodes to wait for before sampling (default: the
            federation's ``min_train_clients``); sampling then proceeds with whoever is
            connected, if at least ``min_train_clients``.
        federation: Rounds, sampling, timeout and local-training settings.
        encryption: HE settings; must match the provisioned keys.
        parameters: Parameter count of the federation's model.
        default_max_examples: Cap on the ``num-examples`` a node may claim
            (``[nodes] default_max_examples``, default 10,000).
        max_examples: Per-node caps by client name (``[nodes.max_examples]``); a node
            not named here gets ``default_max_examples``.
        front: The public front's deadlines and limits (``[front]``).

    """

    source: Path
    address: str
    state_dir: Path
    ca_cert: Path | None
    server_cert: Path | None
    server_key: Path | None
    public_context: Path | None
    nodes_dir: Path | None
    plan: Path | None
    operator_key: Path | None
    node_wait_timeout: float
    min_available_clients: int
    federation: FederationConfig
    encryption: EncryptionConfig
    parameters: int
    default_max_examples: int = DEFAULT_MAX_EXAMPLES
    max_examples: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    front: FrontLimits = field(default_factory=FrontLimits)

    @classmethod
    def from_toml(
        cls, path: Path, *, allow_insecure_permissions: bool = False
    ) -> ServerDeployConfig:
        """Parse and check ``path``; relative paths are relative to its directory.

        Nothing is created or changed on disk. Files that are named are checked for their
        kind (file or directory), the public context must exist when encryption is on,
        the server key must be private (mode 0600), and the state directory must exist
        or be creatable, and be writable.

        Args:
            path: The ``server.toml`` file.
            allow_insecure_permissions: Accept a server key that group or other users
                may read (trials only; a warning is logged).

        Raises:
            ValueError: the file cannot be read or parsed, or a key is unknown, of the
                wrong type or out of range; one line naming the table and key.

        """
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text: {exc.reason}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from exc
        except RecursionError as exc:
            raise ValueError(f"{path} is not valid TOML: nested too deeply") from exc
        unknown = sorted(set(raw) - set(_TABLES))
        if unknown:
            raise ValueError(
                f"unknown table(s) or key(s) outside a table in {path}: "
                f"{', '.join(map(repr, unknown))}; known tables: {', '.join(_TABLES)}"
            )
        base = path.resolve().parent
        server = TomlTable(raw, "server", _SERVER_KEYS)
        address = server.raw.get("address", "0.0.0.0:9092")
        if not isinstance(address, str):
            raise ValueError(
                f"[server] address must be a HOST:PORT string, got {show_value(address)}"
            )
        split_address(address)
        paths = {key: server.path(key, base) for key in (*_FILE_KEYS, "nodes_dir")}
        state = server.path("state_dir", base, "state") or base / "state"
        wait = server.number("node_wait_timeout", 300.0, low=0.0, high=MAX_TIMEOUT, low_open=True)
        model = TomlTable(raw, "model", ("parameters",))
        if "parameters" not in model.raw:
            raise ValueError("[model] parameters (the model's parameter count) is required")
        parameters = model.integer("parameters", 0, low=1)
        federation = _federation(raw)
        encryption = _encryption(raw)
        available = server.integer("min_available_clients", federation.min_train_clients, low=1)
        if encryption.enabled and federation.min_train_clients > encryption.max_clients:
            raise ValueError(
                f"[federation] min_train_clients = {federation.min_train_clients} exceeds "
                f"[encryption] max_clients = {encryption.max_clients}: no round could ever "
                "aggregate enough updates"
            )
        default_cap, caps = _node_caps(raw)
        front = _front(raw)
        _check_server_files(server, paths, encryption, caps, allow_insecure_permissions)
        check_usable_dir(state, "[server] state_dir")
        return cls(
            source=path.resolve(),
            address=address,
            state_dir=state,
            ca_cert=paths["ca_cert"],
            server_cert=paths["server_cert"],
            server_key=paths["server_key"],
            public_context=paths["public_context"],
            nodes_dir=paths["nodes_dir"],
            plan=paths["plan"],
            operator_key=paths["operator_key"],
            node_wait_timeout=wait,
            min_available_clients=available,
            federation=federation,
            encryption=encryption,
            parameters=parameters,
            default_max_examples=default_cap,
            max_examples=MappingProxyType(caps),
            front=front,
        )

    def run_spec(self) -> DeployedRun:
        """What the ServerApp is told of this configuration (no TLS or node material).

        Every field of the spec is the field of the same name here.
        """
        return DeployedRun(**{f.name: getattr(self, f.name) for f in fields(DeployedRun)})

    def signer(self, codec: UpdateCodec) -> OperatorSigner:
        """The signer of this federation's rounds (see :meth:`DeployedRun.signer`)."""
        return self.run_spec().signer(codec)

    def max_examples_for(self, name: str) -> int:
        """The ``num-examples`` cap of the node provisioned as ``name``."""
        return self.max_examples.get(name, self.default_max_examples)

    def codec(self) -> UpdateCodec:
        """The server codec, after checking the key material against ``[encryption]``.

        Raises:
            SecretKeyExposureError: the configured context holds a secret key.
            ValueError: encryption is on but no usable public context is configured, or
                the context was made under other HE parameters than ``[encryption]``
                says (the message names the key that differs).

        """
        try:
            codec = self.run_spec().codec()
        except PayloadError as exc:
            raise ValueError(
                self._key_mismatch()
                or f"[server] public_context {self.public_context} is not usable: {exc}"
            ) from exc
        mismatch = self._key_mismatch()
        if mismatch is not None:
            raise ValueError(mismatch)
        return codec

    def _key_mismatch(self) -> str | None:
        """Which ``[encryption]`` key disagrees with the public context, if any."""
        if not self.encryption.enabled or self.public_context is None:
            return None
        return _key_mismatch(self.encryption, self.public_context.read_bytes(), self.public_context)

    def node_keys(self) -> list[Path]:
        """The node public keys to register."""
        if self.nodes_dir is None:
            return []
        return sorted(self.nodes_dir.glob("*.pub"))


def _key_mismatch(config: EncryptionConfig, public: bytes, path: Path) -> str | None:
    """Which ``[encryption]`` key disagrees with the key material at ``path``, if any."""
    try:
        made = key_parameters(public)
    except PayloadError:
        return None  # not key material at all: the caller reports the codec's error
    where = f"the keys in [server] public_context {path}"
    if made.scheme != config.scheme:
        return (
            f"[encryption] scheme = {config.scheme!r} does not match {where}, "
            f"made for {made.scheme!r}"
        )
    checks: list[tuple[str, object, object]] = [
        ("poly_modulus_degree", config.poly_modulus_degree, made.poly_modulus_degree),
        ("coeff_mod_bit_sizes", list(config.coeff_mod_bit_sizes), list(made.coeff_mod_bit_sizes)),
    ]
    if made.plain_modulus_bits is not None:
        checks.append(("plain_modulus_bits", config.plain_modulus_bits, made.plain_modulus_bits))
    for key, configured, actual in checks:
        if configured != actual:
            return (
                f"[encryption] {key} = {configured} does not match {where}, made with "
                f"{key} = {actual}; [encryption] must match the provisioned keys"
            )
    return None


# DNS labels (underscores allowed, as container and service names use them).
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
_DOTTED_NUMBERS = re.compile(r"[0-9.]+")
_PORT = re.compile(r"[0-9]{1,5}")


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of a ``HOST:PORT`` address; brackets of IPv6 hosts are removed.

    The host is a DNS name, an IPv4 address or a bracketed IPv6 address
    (``[::1]:9092``); the port is 1..65535.

    Raises:
        ValueError: the address is not of that form (naming ``[server] address``).

    """
    bad = ValueError(
        f"[server] address must be HOST:PORT (a DNS name, an IPv4 address or a "
        f"[bracketed] IPv6 address, and a port 1..65535), got {show_value(address)}"
    )
    host, sep, port = address.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise bad
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise bad from None
        return host[1:-1], int(port)
    if not _HOSTNAME.fullmatch(host):
        raise bad
    if _DOTTED_NUMBERS.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise bad from None
    return host, int(port)
