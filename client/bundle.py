"""A client's bundle, as written by ``sepals provision``, read and checked.

Every problem is one line naming the file and the key: a malformed ``bundle.json``
(not JSON, a missing key, a wrong type, a bad plan or encryption value) is a
:class:`ValueError`, and a secret file that other users may read is an
:class:`~sepals.common.errors.InsecureFileError` naming the ``chmod`` to run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from logging import WARNING
from pathlib import Path
from typing import Any

from sepals.common.config import EncryptionConfig
from sepals.common.errors import ForeignKeyError
from sepals.common.files import require_private
from sepals.common.log import log
from sepals.common.plan import HEX32, FederationPlan
from sepals.common.scheme import context_fingerprint

BUNDLE_FILE = "bundle.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_INT_FIELDS = ("poly_modulus_degree", "scale_bits", "max_clients", "plain_modulus_bits")


def _encryption(raw: object, where: str) -> EncryptionConfig:
    """Parse the ``encryption`` object of a bundle, type by type."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: encryption must be an object, got {type(raw).__name__}")
    known = {f.name for f in fields(EncryptionConfig)}
    unknown = sorted(set(raw) - known - {"quant_step"})
    if unknown:
        raise ValueError(f"{where}: encryption has unknown key(s): {', '.join(unknown)}")
    values: dict[str, Any] = {k: v for k, v in raw.items() if k in known}
    if "scheme" in values and not isinstance(values["scheme"], str):
        raise ValueError(f"{where}: encryption.scheme must be a string")
    for key in _INT_FIELDS:
        value = values.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{where}: encryption.{key} must be an integer, got {value!r}")
    bound = values.get("update_bound", 1.0)
    if not isinstance(bound, int | float) or isinstance(bound, bool):
        raise ValueError(f"{where}: encryption.update_bound must be a number, got {bound!r}")
    bits = values.get("coeff_mod_bit_sizes", [])
    if not isinstance(bits, list) or not all(
        isinstance(b, int) and not isinstance(b, bool) for b in bits
    ):
        raise ValueError(
            f"{where}: encryption.coeff_mod_bit_sizes must be a list of integers, got {bits!r}"
        )
    if "coeff_mod_bit_sizes" in values:
        values["coeff_mod_bit_sizes"] = tuple(bits)
    try:
        return EncryptionConfig(**values)
    except ValueError as exc:
        raise ValueError(f"{where}: encryption: {exc}") from exc


def _string(meta: dict[str, Any], key: str, where: str, pattern: re.Pattern[str] | None) -> str:
    if key not in meta:
        raise ValueError(f"{where} lacks {key!r}")
    value = meta[key]
    if not isinstance(value, str) or not value or (pattern and not pattern.match(value)):
        raise ValueError(f"{where}: {key} is malformed: {value!r}")
    return value


@dataclass(frozen=True)
class ClientBundle:
    """A client's bundle as written by ``sepals provision``.

    Attributes:
        root: The bundle directory.
        name: The client's name (its id in reports and ledgers).
        server_address: ``host:port`` of the server.
        ca_cert: TLS root certificate that signs the server's certificate.
        node_key: The node's private authentication key (OpenSSH PEM).
        secret_context: The HE secret context (``None`` when encryption is off).
        encryption: The federation's encryption settings.
        he_fingerprint: Hex fingerprint of the HE key (``""`` when encryption is off).
        plan: The federation's plan: what this client will serve, and its noise
            calibration.

    """

    root: Path
    name: str
    server_address: str
    ca_cert: Path
    node_key: Path
    secret_context: Path | None
    encryption: EncryptionConfig
    he_fingerprint: str
    plan: FederationPlan

    @classmethod
    def load(cls, root: Path | str, *, allow_insecure_permissions: bool = False) -> ClientBundle:
        """Read and check a bundle directory.

        Args:
            root: The bundle directory.
            allow_insecure_permissions: Accept secret files that other users may read
                (trials only; a warning is logged).

        Raises:
            ValueError: a file is missing, ``bundle.json`` is malformed (the message
                names the file and key), or the bundle is not a client bundle.
            InsecureFileError: ``node.key`` or ``he-secret.ctx`` is accessible by group
                or other users (the message names the ``chmod`` to run).

        """
        root = Path(root).expanduser().resolve()
        path = root / BUNDLE_FILE
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(
                f"{root} is not a sepals client bundle: cannot read {BUNDLE_FILE} "
                f"({exc.strerror or exc})"
            ) from exc
        try:
            meta = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{path} is not JSON ({exc.args[0]})") from exc
        if not isinstance(meta, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
        if meta.get("role") != "client":
            raise ValueError(f"{root} holds a {meta.get('role')!r} bundle, not a client bundle")
        where = str(path)
        name = _string(meta, "name", where, _NAME)
        address = _string(meta, "server_address", where, None)
        if "encryption" not in meta:
            raise ValueError(f"{where} lacks 'encryption'")
        encryption = _encryption(meta["encryption"], where)
        fingerprint = meta.get("he_key_fingerprint", "")
        if not isinstance(fingerprint, str) or (
            encryption.enabled and not HEX32.match(fingerprint)
        ):
            raise ValueError(f"{where}: he_key_fingerprint is malformed: {fingerprint!r}")
        if "plan" not in meta:
            raise ValueError(
                f"{where} lacks 'plan' (bundles from before federation plans: re-provision)"
            )
        try:
            plan = FederationPlan.from_dict(meta["plan"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        if encryption.enabled and plan.key_fingerprint != fingerprint:
            raise ValueError(
                f"{where}: plan.key_fingerprint {plan.key_fingerprint} is not the bundle's "
                f"HE key {fingerprint}"
            )
        secret = root / "he-secret.ctx" if encryption.enabled else None
        for file in (root / "ca.pem", root / "node.key", secret):
            if file is not None and not file.is_file():
                raise ValueError(f"bundle {root} lacks {file.name}")
        secrets_ = ((root / "node.key", "node key"), (secret, "HE secret key"))
        for file, what in secrets_:
            if file is None:
                continue
            require_private(file, what, allow_insecure=allow_insecure_permissions)
            if file.stat().st_mode & 0o077:
                log(WARNING, "%s %s is readable by other users (allowed for a trial)", what, file)
        return cls(
            root=root,
            name=name,
            server_address=address,
            ca_cert=root / "ca.pem",
            node_key=root / "node.key",
            secret_context=secret,
            encryption=encryption,
            he_fingerprint=fingerprint,
            plan=plan,
        )

    def read_secret_context(self) -> bytes | None:
        """The secret context bytes, checked against the bundle's fingerprint.

        Raises:
            ForeignKeyError: the context is not the one this bundle was provisioned with.

        """
        if self.secret_context is None:
            return None
        data = self.secret_context.read_bytes()
        actual = context_fingerprint(data).hex()
        if self.he_fingerprint and actual != self.he_fingerprint:
            raise ForeignKeyError(
                f"{self.secret_context} has key {actual}, the bundle expects {self.he_fingerprint}"
            )
        return data
