"""A client's bundle, as written by ``sepals provision``, read and checked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

from sepals.common.codec import context_fingerprint
from sepals.common.config import EncryptionConfig
from sepals.common.errors import ForeignKeyError
from sepals.common.log import log


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

    """

    root: Path
    name: str
    server_address: str
    ca_cert: Path
    node_key: Path
    secret_context: Path | None
    encryption: EncryptionConfig
    he_fingerprint: str

    @classmethod
    def load(cls, root: Path | str) -> ClientBundle:
        """Read and check a bundle directory.

        Raises:
            ValueError: a file is missing or the bundle is not a client bundle.

        """
        root = Path(root).expanduser().resolve()
        try:
            meta = json.loads((root / "bundle.json").read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{root} is not a sepals client bundle: {exc}") from exc
        if meta.get("role") != "client":
            raise ValueError(f"{root} holds a {meta.get('role')!r} bundle, not a client bundle")
        enc_raw = dict(meta["encryption"])
        enc_raw["coeff_mod_bit_sizes"] = tuple(enc_raw["coeff_mod_bit_sizes"])
        encryption = EncryptionConfig(**enc_raw)
        secret = root / "he-secret.ctx" if encryption.scheme != "none" else None
        for path in (root / "ca.pem", root / "node.key", secret):
            if path is not None and not path.is_file():
                raise ValueError(f"bundle {root} lacks {path.name}")
        for path in (root / "node.key", secret):
            if path is not None and path.stat().st_mode & 0o077:
                log(WARNING, "%s is readable by other users; chmod 600 it", path)
        return cls(
            root=root,
            name=str(meta["name"]),
            server_address=str(meta["server_address"]),
            ca_cert=root / "ca.pem",
            node_key=root / "node.key",
            secret_context=secret,
            encryption=encryption,
            he_fingerprint=str(meta.get("he_key_fingerprint", "")),
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
