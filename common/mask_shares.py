"""Shamir shares of a client's mask secrets, and their encryption from peer to peer.

A client splits two 16-byte secrets among its ``k`` neighbours with threshold ``T``: the
seed of its mask-agreement key (needed if it drops out, to remove the pairwise masks its
neighbours added) and its self-mask seed (needed if it uploads). Sharing is
pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir`` over GF(2^128), the library
under Flower's ``secure_aggregation`` primitives, called on the one 16-byte block
directly (Flower's wrapper pads a 16-byte secret to two blocks, doubling the server's
reconstruction time). A share is a 2-byte index and 16 bytes.

The two shares meant for one neighbour travel as one AES-256-GCM ciphertext, relayed by
the server. Its key comes from an X25519 agreement between the two clients' fresh
*share* keys (separate from the mask keys, whose private half may be revealed), through
HKDF-SHA256. The associated data binds the federation, the round, the sender and the
recipient, so the server can neither read a share nor hand it to another client or round
without the recipient noticing.
"""

from __future__ import annotations

import os
import struct

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sepals.common.errors import MaskProtocolError
from sepals.common.masking import SECRET_BYTES, check_node_id

_SHARE_DOMAIN = b"sepals/mask-share/v1\x00"
_NONCE_BYTES = 12
SHARE_BYTES = 2 + SECRET_BYTES
_INDEX = struct.Struct("<H")
_PAIR = struct.Struct("<H")

__all__ = ["MaskProtocolError", "combine_secret", "open_shares", "seal_shares", "split_secret"]


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` Shamir shares of a 16-byte ``secret``, any ``threshold`` of which rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a mask secret has {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= count < 2**16:
        raise ValueError(f"need 1 <= threshold <= count, got {threshold} of {count}")
    if threshold == 1:
        # pycryptodome needs k > 1; with T = 1 every share is the secret itself.
        return [_INDEX.pack(i) + secret for i in range(1, count + 1)]
    return [
        _INDEX.pack(i) + share for i, share in Shamir.split(threshold, count, secret, ssss=False)
    ]


def combine_secret(shares: list[bytes], threshold: int) -> bytes:
    """The secret behind ``threshold`` (or more) distinct shares; only ``threshold`` are used.

    Raises:
        MaskProtocolError: too few, malformed or repeated shares.

    """
    if not all(isinstance(s, bytes) and len(s) == SHARE_BYTES for s in shares):
        raise MaskProtocolError("malformed secret share")
    points = [(_INDEX.unpack_from(s)[0], s[2:]) for s in shares]
    indices = [i for i, _ in points]
    if len(set(indices)) != len(indices) or min(indices, default=1) < 1:
        raise MaskProtocolError("repeated or invalid share index")
    if len(points) < threshold:
        raise MaskProtocolError(f"{len(points)} shares, {threshold} needed")
    if threshold == 1:
        return points[0][1]
    return bytes(Shamir.combine(points[:threshold], ssss=False))


def _aad(federation_id: str, server_round: int, sender: int, recipient: int) -> bytes:
    return (
        _SHARE_DOMAIN
        + federation_id.encode()
        + b"\x00"
        + struct.pack("<QQQ", server_round, check_node_id(sender), check_node_id(recipient))
    )


def _share_key(own: X25519PrivateKey, peer_public: bytes, aad: bytes) -> bytes:
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise MaskProtocolError("bad share public key") from exc
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=aad).derive(shared)


def seal_shares(
    own: X25519PrivateKey,
    peer_public: bytes,
    federation_id: str,
    server_round: int,
    sender: int,
    recipient: int,
    pair_share: bytes,
    self_share: bytes,
) -> bytes:
    """Encrypt the two shares ``sender`` gives ``recipient`` (nonce || AES-GCM ciphertext)."""
    aad = _aad(federation_id, server_round, sender, recipient)
    key = _share_key(own, peer_public, aad)
    body = _PAIR.pack(len(pair_share)) + pair_share + self_share
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, body, aad)


def open_shares(
    own: X25519PrivateKey,
    peer_public: bytes,
    federation_id: str,
    server_round: int,
    sender: int,
    recipient: int,
    blob: bytes,
) -> tuple[bytes, bytes]:
    """Decrypt what ``sender`` sealed for ``recipient``: ``(pair share, self share)``.

    Raises:
        MaskProtocolError: the blob was altered, sealed for another recipient, round or
            federation, or is not two shares.

    """
    if not isinstance(blob, bytes) or len(blob) <= _NONCE_BYTES:
        raise MaskProtocolError("malformed sealed share")
    aad = _aad(federation_id, server_round, sender, recipient)
    key = _share_key(own, peer_public, aad)
    try:
        body = AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise MaskProtocolError("sealed share fails authentication") from exc
    (size,) = _PAIR.unpack_from(body)
    pair_share, self_share = body[2 : 2 + size], body[2 + size :]
    if len(pair_share) != SHARE_BYTES or len(self_share) != SHARE_BYTES:
        raise MaskProtocolError("sealed share holds no pair of shares")
    return pair_share, self_share
