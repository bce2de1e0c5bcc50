"""The encryption scheme an ``EncryptionConfig`` names: its keys and its codecs.

One place turns a scheme (``bfv``, ``ckks`` or off) into key material and into the
codec each party uses: a client's codec holds the secret key, the server's only the
public context, and a secret context handed to the server is refused by the codec.
"""

from __future__ import annotations

from sepals.common.bfv import BfvCodec
from sepals.common.ckks import (
    CkksCodec,
    ckks_fingerprint,
    generate_ckks_context,
    public_ckks_context,
)
from sepals.common.codec import PlainCodec, UpdateCodec
from sepals.common.config import EncryptionConfig
from sepals.common.errors import MissingSecretKeyError
from sepals.common.seal_bundle import (
    bfv_fingerprint,
    generate_bfv_bundle,
    is_bfv_bundle,
    public_bfv_bundle,
)


def generate_secret_context(config: EncryptionConfig) -> bytes:
    """Create fresh keys for ``config`` and return the clients' serialized secret context.

    For ``bfv`` this is a sepals key bundle (:mod:`sepals.common.seal_bundle`), for
    ``ckks`` a TenSEAL context. The result holds the secret key: it is for clients only.
    Derive the server's context with :func:`public_context_bytes`.
    """
    if config.scheme == "bfv":
        return generate_bfv_bundle(config)
    if config.scheme != "ckks":
        raise ValueError(f"cannot generate keys for scheme {config.scheme!r}")
    return generate_ckks_context(config)


def public_context_bytes(secret_context: bytes) -> bytes:
    """Strip the secret key from a serialized context (BFV bundle or TenSEAL context)."""
    if is_bfv_bundle(secret_context):
        return public_bfv_bundle(secret_context)
    return public_ckks_context(secret_context)


def context_fingerprint(context: bytes) -> bytes:
    """Fingerprint of a serialized context (secret or public: same key, same value)."""
    if is_bfv_bundle(context):
        return bfv_fingerprint(context)
    return ckks_fingerprint(context)


def make_client_codec(config: EncryptionConfig, secret_context: bytes | None) -> UpdateCodec:
    """The codec a client uses for ``config``: plain, BFV or CKKS with the secret key."""
    if not config.enabled:
        return PlainCodec()
    if secret_context is None:
        raise MissingSecretKeyError("encryption is on but no secret context was given")
    if config.scheme == "bfv":
        return BfvCodec.for_client(secret_context, config)
    return CkksCodec.for_client(secret_context, config)


def make_server_codec(config: EncryptionConfig, public_context: bytes | None) -> UpdateCodec:
    """The codec the server uses for ``config``: plain, BFV or CKKS with the public context."""
    if not config.enabled:
        return PlainCodec()
    if public_context is None:
        raise ValueError("encryption is on but no public context was given to the server")
    if config.scheme == "bfv":
        return BfvCodec.for_server(public_context, config)
    return CkksCodec.for_server(public_context, config)
