"""Shamir shares of a client's mask secrets, and their encryption from peer to peer.

A client splits two 16-byte secrets among its ``k`` neighbours with threshold ``T``: the
seed of its mask-agreement key (needed if it drops out, to remove the pairwise masks its
neighbours added) and its self-mask seed (needed if it uploads). Sharing is
pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir`` over GF(2^128), the library
under Flower's ``secure_aggregation`` primitives, called on the one 16-byte block
directly (Flower's wrapper pads a 16-byte secret to two blocks). A share is a 2-byte
index and 16 bytes: the polynomial's value at that index, big-endian, as pycryptodome
writes it.

The server rebuilds many secrets at once (:func:`combine_secrets`): Lagrange
interpolation at ``x = 0`` in the same field, with ``galois``'s GF(2^128) arithmetic on
arrays. The Lagrange coefficients depend only on the shares' indices, so the secrets are
grouped by the index set they are rebuilt from (each secret reuses an index set already
chosen for another where its shares allow) and each group's coefficients are computed
once and applied to all its secrets at once.

The two shares meant for one neighbour travel as one AES-256-GCM ciphertext, relayed by
the server. Its key comes from an X25519 agreement between the two clients' fresh
*share* keys (separate from the mask keys, whose private half may be revealed), through
HKDF-SHA256. The associated data binds the federation, the round, the sender and the
recipient, so the server can neither read a share nor hand it to another client or round
without the recipient noticing.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sepals.common.errors import MaskProtocolError
from sepals.common.mask_prg import SECRET_BYTES
from sepals.common.masking import check_node_id

if TYPE_CHECKING:
    import galois

_SHARE_DOMAIN = b"sepals/mask-share/v1\x00"
_NONCE_BYTES = 12
SHARE_BYTES = 2 + SECRET_BYTES
_INDEX = struct.Struct("<H")
_PAIR = struct.Struct("<H")
#: pycryptodome's Shamir field: GF(2)[x] / (x^128 + x^7 + x^2 + x + 1).
_FIELD_POLY = (1 << 128) | 0x87

__all__ = [
    "MaskProtocolError",
    "combine_secret",
    "combine_secrets",
    "open_shares",
    "seal_shares",
    "split_secret",
]


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


def combine_secret(shares: Sequence[bytes], threshold: int) -> bytes:
    """The secret behind ``threshold`` (or more) distinct shares; only ``threshold`` are used.

    Raises:
        MaskProtocolError: too few, malformed or repeated shares.

    """
    return combine_secrets([shares], threshold)[0]


def combine_secrets(share_sets: Sequence[Sequence[bytes]], threshold: int) -> list[bytes]:
    """The secret behind each share set, in order (see :func:`combine_secret`).

    Each secret is rebuilt from ``threshold`` of its shares, chosen so that secrets share
    index sets (and so Lagrange coefficients) as far as their shares allow: a set already
    chosen for an earlier secret is reused when the secret has shares at all its indices,
    else its ``threshold`` lowest indices make a new one.

    Raises:
        MaskProtocolError: a set with too few, malformed or repeated shares.

    """
    points = [_points(shares, threshold) for shares in share_sets]
    if threshold == 1:
        return [next(iter(p.values())) for p in points]
    index_sets: list[tuple[int, ...]] = []
    groups: dict[tuple[int, ...], list[int]] = {}
    for at, held in enumerate(points):
        xs = next((xs for xs in index_sets if all(x in held for x in xs)), None)
        if xs is None:
            xs = tuple(sorted(held)[:threshold])
            index_sets.append(xs)
        groups.setdefault(xs, []).append(at)
    coefficients = _lagrange_at_zero(list(groups))
    field = _field()
    secrets: list[bytes] = [b""] * len(points)
    for (xs, members), weights in zip(groups.items(), coefficients, strict=True):
        values = np.array(
            [[int.from_bytes(points[at][x], "big") for x in xs] for at in members], dtype=object
        )
        rebuilt = np.add.reduce(field(values) * weights[np.newaxis, :], axis=1)
        for at, value in zip(members, rebuilt.tolist(), strict=True):
            secrets[at] = int(value).to_bytes(SECRET_BYTES, "big")
    return secrets


def _points(shares: Sequence[bytes], threshold: int) -> dict[int, bytes]:
    """``{index: value}`` of a share set, validated."""
    if not all(isinstance(s, bytes) and len(s) == SHARE_BYTES for s in shares):
        raise MaskProtocolError("malformed secret share")
    points = {_INDEX.unpack_from(s)[0]: s[2:] for s in shares}
    if len(points) != len(shares) or min(points, default=1) < 1:
        raise MaskProtocolError("repeated or invalid share index")
    if len(points) < threshold:
        raise MaskProtocolError(f"{len(points)} shares, {threshold} needed")
    return points


@functools.cache
def _field() -> type[galois.FieldArray]:
    """GF(2^128) with pycryptodome's modulus, built once per process on first use."""
    # Imported here, not at the top: galois loads numba (about a second), which the
    # clients, which only split and seal, should not pay for.
    import galois

    # The extension's set-up evaluates a polynomial over its prime subfield GF(2), which
    # galois would JIT-compile (about a second, every process) in GF(2)'s default mode;
    # building GF(2) first in pure-Python mode spares it. The subfield's own arithmetic
    # is never used here.
    galois.GF(2, compile="python-calculate")
    return galois.GF(
        2**128,
        irreducible_poly=galois.Poly.Int(_FIELD_POLY),
        primitive_element=2,
        verify=False,
        # Elements above 64 bits are Python ints: galois' pure-Python kernels, no JIT.
        compile="python-calculate",
    )


def _lagrange_at_zero(index_sets: Sequence[tuple[int, ...]]) -> galois.FieldArray:
    """Per index set ``x``, the weights ``c_i`` with ``f(0) = sum_i c_i f(x_i)``.

    ``c_i = prod_{j != i} x_j / (x_j - x_i) = prod_j x_j / e_i`` with
    ``e_i = x_i prod_{j != i} (x_j - x_i)``; all the sets' ``e_i`` are inverted with
    one field inversion (:func:`_reciprocals`).
    """
    field = _field()
    x = field(np.array(index_sets, dtype=object))
    size = x.shape[1]
    factors = x[:, np.newaxis, :] - x[:, :, np.newaxis]  # [s, i, j] = x_j - x_i
    factors[:, np.arange(size), np.arange(size)] = x
    e: galois.FieldArray = np.multiply.reduce(factors, axis=2)
    products: galois.FieldArray = np.multiply.reduce(x, axis=1)
    weights: galois.FieldArray = _reciprocals(e) * products[:, np.newaxis]
    return weights


def _reciprocals(values: galois.FieldArray) -> galois.FieldArray:
    """``1 / values`` elementwise for a 2-D array of non-zero elements, with one inversion.

    Field inversion is the costly operation in galois' pure-Python GF(2^128), so each
    row's entries are inverted through the row's product (prefix and suffix products),
    and the rows' products through their own product.
    """
    field = type(values)
    rows, size = values.shape
    one = field(1)

    def exclusive_products(items: list[galois.FieldArray]) -> list[galois.FieldArray]:
        """Per item, the product of all the others (prefix times suffix)."""
        ones = items[0] ** 0
        prefix, suffix = [ones], [ones]
        for item in items[:-1]:
            prefix.append(prefix[-1] * item)
        for item in items[:0:-1]:
            suffix.append(suffix[-1] * item)
        return [p * q for p, q in zip(prefix, reversed(suffix), strict=True)]

    columns = [values[:, i] for i in range(size)]
    row_others = exclusive_products(columns)  # per column i: prod_{k != i} values[:, k]
    totals = row_others[0] * columns[0]  # each row's product
    scalars = [totals[r] for r in range(rows)]
    inverse_all = one / (exclusive_products(scalars)[0] * scalars[0])
    inverse_totals = field(
        np.array([int(v * inverse_all) for v in exclusive_products(scalars)], dtype=object)
    )
    inverses: galois.FieldArray = np.stack(row_others, axis=1) * inverse_totals[:, np.newaxis]
    return inverses


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
