"""The operator's signature on every round: the signed bytes, the signer and the check.

Each round config is signed together with a digest of the global model it carries, so
a client serves only rounds that the operator who fixed its plan sent, with the model
that operator's server produced.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)

from sepals.common.plan import (
    HEX32,
    KEY_FEDERATION_ID,
    KEY_SIGNATURE,
    FederationPlan,
    PlanViolationError,
)
from sepals.common.records import GlobalModel, read_global_model

_SIGNED_DOMAIN = b"sepals-round/1\n"


_GLOBAL_DOMAIN = b"sepals-global/1"


def generate_operator_key() -> tuple[bytes, str]:
    """A fresh operator signing key: ``(private key PEM (PKCS#8), public key hex)``."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return private, public.hex()


def global_model_digest(global_model: tuple[bytes, float] | GlobalModel | None) -> str:
    """SHA-256 (hex) of a global model as a client reads it: payload, weight total, count.

    ``None`` (round 1: no global model, every client builds the seeded one) has its own
    digest, so a signed round-1 config cannot be replayed with a model either.
    """
    digest = hashlib.sha256(_GLOBAL_DOMAIN)
    if global_model is None:
        digest.update(b"\x00")
        return digest.hexdigest()
    summands = global_model.summands if isinstance(global_model, GlobalModel) else None
    digest.update(b"\x01" + struct.pack("<d", global_model[1]))
    if summands is not None:
        digest.update(b"\x02" + struct.pack("<q", summands))
    digest.update(global_model[0])
    return digest.hexdigest()


def signed_bytes(message_type: str, config: Mapping[str, Any], global_digest: str) -> bytes:
    """The bytes the operator signs, as canonical JSON.

    They hold the message type, every config field but the signature, and the global
    model's digest.

    Raises:
        ValueError: a config value is not a JSON scalar (or is NaN or infinite).

    """
    body = {k: v for k, v in config.items() if k != KEY_SIGNATURE}
    for key, value in body.items():
        if not isinstance(value, str | int | float | bool):
            raise ValueError(f"config field {key!r} is a {type(value).__name__}")
    doc = {"config": body, "global-sha256": global_digest, "message-type": message_type}
    try:
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise ValueError("config holds a non-finite number") from exc
    return _SIGNED_DOMAIN + text.encode()


class OperatorSigner:
    """Signs round configs with the operator's key: the strategy's ``round_signer``.

    ``EncryptedFedAvg(round_signer=OperatorSigner(pem, plan.federation_id))`` adds
    ``federation-id`` and ``signature`` to every train and evaluate config.

    Args:
        private_key_pem: The operator's Ed25519 private key (PKCS#8 PEM, unencrypted),
            as ``sepals provision`` writes it to ``server/operator.key``.
        federation_id: The plan's federation id.

    Raises:
        ValueError: the key is not an Ed25519 private key, or the id is malformed.

    """

    def __init__(self, private_key_pem: bytes, federation_id: str) -> None:
        try:
            key = serialization.load_pem_private_key(private_key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError("operator key is not an unencrypted PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"operator key must be Ed25519, got {type(key).__name__}")
        if not isinstance(federation_id, str) or not HEX32.match(federation_id):
            raise ValueError(
                f"federation id must be 32 lowercase hex digits, got {federation_id!r}"
            )
        self._key = key
        self.federation_id = federation_id
        self.public_key_hex = (
            key.public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            .hex()
        )

    def __repr__(self) -> str:
        return f"OperatorSigner(federation_id={self.federation_id!r}, key={self.public_key_hex})"

    @classmethod
    def for_plan(cls, key_path: Path, plan: FederationPlan) -> OperatorSigner:
        """The signer of ``plan`` with the private key at ``key_path``.

        Raises:
            ValueError: the file cannot be read, or its key is not the plan's operator key
                (clients would refuse every round).

        """
        try:
            pem = key_path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read operator key {key_path}: {exc.strerror or exc}") from exc
        try:
            signer = cls(pem, plan.federation_id)
        except ValueError as exc:
            raise ValueError(f"{key_path}: {exc}") from exc
        if signer.public_key_hex != plan.operator_key:
            raise ValueError(
                f"{key_path} is not the operator key of federation {plan.federation_id}: "
                "clients would refuse every round"
            )
        return signer

    def sign(self, message_type: str, config: Mapping[str, Any], global_digest: str) -> str:
        """Hex signature of a config (which must already carry the federation id)."""
        return self._key.sign(signed_bytes(message_type, config, global_digest)).hex()

    def __call__(self, message_type: str, config: dict[str, Any], arrays: Any) -> dict[str, Any]:
        """``config`` with this federation's id and the signature added.

        Args:
            message_type: ``train`` or ``evaluate`` (Flower's ``MessageType``).
            config: The round config (:meth:`RoundConfig.to_record_dict`).
            arrays: The ``global`` ArrayRecord sent with it.

        """
        out = {k: v for k, v in config.items() if k != KEY_SIGNATURE}
        out[KEY_FEDERATION_ID] = self.federation_id
        digest = global_model_digest(read_global_model(arrays))
        out[KEY_SIGNATURE] = self.sign(message_type, out, digest)
        return out


def verify_round_signature(
    plan: FederationPlan,
    message_type: str,
    config: Mapping[str, Any],
    global_digest: str,
) -> None:
    """Check that ``config`` is this federation's and signed by its operator.

    Raises:
        PlanViolationError: ``foreign federation`` (missing or other federation id),
            ``unsigned round`` or ``bad signature`` (wrong key, or anything changed
            after signing: a field, the message type or the global model).

    """
    fed = config.get(KEY_FEDERATION_ID)
    if fed != plan.federation_id:
        raise PlanViolationError(
            "foreign federation",
            "no federation id" if fed is None else "the message carries another federation id",
        )
    signature = config.get(KEY_SIGNATURE)
    if signature is None:
        raise PlanViolationError("unsigned round")
    try:
        raw = bytes.fromhex(signature) if isinstance(signature, str) else b""
        plan.public_key().verify(raw, signed_bytes(message_type, config, global_digest))
    except (InvalidSignature, ValueError) as exc:
        raise PlanViolationError("bad signature", type(exc).__name__) from exc
