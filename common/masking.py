"""Pairwise and self masks over the BFV codec's slots (SecAgg+, Bell et al., CCS 2020).

Every sampled client adds, modulo the plaintext modulus ``t``, to each packed slot of its
update (before encryption):

* a **self mask** ``PRG(b_i)``, where ``b_i`` is a fresh 32-byte seed of its own;
* for every neighbour ``j`` in the round's graph, ``+PRG(s_ij)`` if its node id is the
  smaller of the two and ``-PRG(s_ij)`` otherwise, where ``s_ij`` is derived from an
  X25519 agreement between the two clients' fresh mask keys.

The pairwise masks cancel in the sum of all uploads; the server removes the self masks of
the clients that uploaded, and the pairwise masks that a dropped client would have
cancelled, once it has reconstructed those secrets from Shamir shares
(:mod:`sepals.common.mask_shares`). Each masked slot is uniform modulo ``t`` to anyone who
lacks the client's self-mask seed, whatever the key that decrypts it.

The PRG (AES-CTR with rejection sampling onto ``[0, t)``) and the sums of mask vectors
are in :mod:`sepals.common.mask_prg`.

The graph: the round's members are ordered by ``SHA-256(graph seed || node id)``, the
graph seed binding the federation id and the round, and each member's neighbours are the
``k / 2`` members on either side of it on that ring (every other member when ``k`` is at
least the member count less one). Every client computes the same graph from the public
member list; the server does not choose it.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sepals.common.federation import FederationConfig
from sepals.common.mask_prg import SECRET_BYTES, SlotVector, signed_mask_sum

MAX_NODE_ID = 2**64
_GRAPH_DOMAIN = b"sepals/mask-graph/v1\x00"
_PAIR_DOMAIN = b"sepals/mask-pair/v1\x00"
_COMMIT_DOMAIN = b"sepals/self-mask-commit/v1\x00"
_KEY_DOMAIN = b"sepals/mask-key/v1\x00"


@dataclass(frozen=True)
class MaskParams:
    """The masking parameters every client of a federation holds in its plan.

    Attributes:
        neighbours: Graph degree ``k``: how many peers each client masks with and shares
            its secrets among. Even, unless the round's members are fewer than ``k + 1``
            (then every member neighbours every other).
        threshold: Shamir threshold ``T``: shares needed to rebuild a client's secret.
            Fewer than ``T`` colluding neighbours learn nothing of it; a client whose
            secret is needed and has fewer than ``T`` responding neighbours makes the
            round fail (it is abandoned, nothing is aggregated).

    """

    neighbours: int
    threshold: int

    def __post_init__(self) -> None:
        for name in ("neighbours", "threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"mask {name} must be an integer >= 1, got {value!r}")
        if self.threshold > self.neighbours:
            raise ValueError(
                f"mask threshold {self.threshold} exceeds the {self.neighbours} neighbours "
                "that hold shares: no secret could ever be rebuilt"
            )

    def degree(self, members: int) -> int:
        """Each member's neighbour count in a round of ``members`` clients."""
        return min(self.neighbours, members - 1)


def default_neighbours(sampled: int) -> int:
    """Graph degree for rounds of ``sampled`` clients: ``2 * ceil(1.5 * log2(n))``, capped.

    ``O(log n)`` as in SecAgg+; the complete graph (``n - 1``) for small rounds (up to
    about 24 clients). Raises ``ValueError`` below two clients: one client cannot mask.
    """
    if sampled < 2:
        raise ValueError(f"masking needs at least 2 clients per round, got {sampled}")
    return min(sampled - 1, 2 * math.ceil(1.5 * math.log2(sampled)))


def default_threshold(neighbours: int) -> int:
    """``floor(2k / 3) + 1``: tolerates up to a third of a client's neighbours dropping.

    With ``2T > k + 1 + C`` even a server that lies about who dropped out cannot collect
    both kinds of share of a client that has at most ``C`` colluding neighbours (Bell et
    al.; the ``+ 1`` is the share of its own self-mask seed that a client keeps).
    """
    return 2 * neighbours // 3 + 1


def resolve_mask_params(
    sampled: int, neighbours: int | None = None, threshold: int | None = None
) -> MaskParams:
    """The parameters for rounds of ``sampled`` clients; ``None`` picks the default.

    Raises:
        ValueError: fewer than 2 clients per round, an odd ``neighbours`` below
            ``sampled - 1``, or a threshold above the degree.

    """
    k = default_neighbours(sampled) if neighbours is None else neighbours
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"mask neighbours must be an integer >= 1, got {k!r}")
    if k < sampled - 1 and k % 2:
        raise ValueError(
            f"mask neighbours must be even when below the {sampled - 1} other clients of a "
            f"round (a ring graph), got {k}"
        )
    t = default_threshold(min(k, max(sampled - 1, 1))) if threshold is None else threshold
    return MaskParams(neighbours=k, threshold=t)


def masked_federation(
    federation: FederationConfig,
    sampled: int,
    neighbours: int | None = None,
    threshold: int | None = None,
    noise_shares: int = 1,
) -> FederationConfig:
    """``federation`` with masking on, for rounds of ``sampled`` clients (``None``: default).

    ``noise_shares`` (distributed DP noise, :attr:`FederationConfig.noise_shares`) is set
    with the masking parameters, since it is only valid with them.

    Raises:
        ValueError: as :func:`resolve_mask_params`, or ``noise_shares`` above the threshold.

    """
    params = resolve_mask_params(sampled, neighbours, threshold)
    return replace(
        federation,
        mask_neighbours=params.neighbours,
        mask_threshold=params.threshold,
        noise_shares=noise_shares,
    )


def check_node_id(node: object) -> int:
    """``node`` if it is a Flower node id (an int in ``[0, 2**64)``), else ``ValueError``."""
    if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < MAX_NODE_ID:
        raise ValueError(f"not a node id: {node!r}")
    return node


def pack_ids(nodes: Iterable[int]) -> bytes:
    """Node ids as little-endian u64s (Flower's records carry only signed 64-bit ints)."""
    ids = [check_node_id(n) for n in nodes]
    return struct.pack(f"<{len(ids)}Q", *ids)


def unpack_ids(data: object) -> list[int]:
    """Inverse of :func:`pack_ids`.

    Raises:
        ValueError: ``data`` is not bytes holding whole u64s.

    """
    if not isinstance(data, bytes) or len(data) % 8:
        raise ValueError("a node list must be bytes of little-endian u64s")
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


def graph_seed(federation_id: str, server_round: int) -> bytes:
    """The public seed that orders a round's members on the ring."""
    return hashlib.sha256(
        _GRAPH_DOMAIN + federation_id.encode() + b"\x00" + struct.pack("<Q", server_round)
    ).digest()


def neighbours_of(node: int, members: Iterable[int], degree: int, seed: bytes) -> tuple[int, ...]:
    """``node``'s neighbours among ``members`` (which must hold it), in ascending id order.

    Symmetric: ``b in neighbours_of(a, ...)`` exactly when ``a in neighbours_of(b, ...)``.

    Raises:
        ValueError: ``node`` is not a member, or the members repeat.

    """
    graph = neighbour_graph(list(members), degree, seed)
    if node not in graph:
        raise ValueError(f"node {node} is not a member of the round")
    return graph[node]


def neighbour_graph(members: Sequence[int], degree: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """Every member's neighbours (see :func:`neighbours_of`)."""
    nodes = [check_node_id(n) for n in members]
    if len(set(nodes)) != len(nodes):
        raise ValueError("round members repeat")
    n = len(nodes)
    if degree >= n - 1:
        ordered = sorted(nodes)
        return {m: tuple(x for x in ordered if x != m) for m in nodes}
    ring = sorted(nodes, key=lambda m: hashlib.sha256(seed + struct.pack("<Q", m)).digest())
    half = degree // 2
    graph: dict[int, tuple[int, ...]] = {}
    for at, m in enumerate(ring):
        picked = {ring[(at + off) % n] for off in range(1, half + 1)}
        picked |= {ring[(at - off) % n] for off in range(1, half + 1)}
        graph[m] = tuple(sorted(picked))
    return graph


def new_secret() -> bytes:
    """A fresh 16-byte secret from the OS CSPRNG."""
    return os.urandom(SECRET_BYTES)


def mask_key(secret: bytes) -> X25519PrivateKey:
    """The X25519 mask-agreement key derived from a 16-byte secret (HKDF-SHA256).

    Deriving the key from 128 bits (X25519's own security level) lets the secret be
    Shamir-shared as a single 16-byte block.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a mask-key secret has {SECRET_BYTES} bytes, got {len(secret)}")
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_DOMAIN).derive(secret)
    return X25519PrivateKey.from_private_bytes(raw)


def mask_public_key(secret: bytes) -> bytes:
    """The raw public key of :func:`mask_key`."""
    return mask_key(secret).public_key().public_bytes_raw()


def new_key_pair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair: the private key and the raw 32-byte public key."""
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes_raw()


def private_key_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32 bytes of an X25519 private key."""
    return key.private_bytes_raw()


def load_private_key(raw: bytes) -> X25519PrivateKey:
    """An X25519 private key from its raw 32 bytes."""
    return X25519PrivateKey.from_private_bytes(raw)


def pairwise_seed(
    own_private: X25519PrivateKey,
    peer_public: bytes,
    federation_id: str,
    server_round: int,
    a: int,
    b: int,
) -> bytes:
    """The mask seed nodes ``a`` and ``b`` share in a round; the same on both.

    16 bytes: an AES-128 key, the 128-bit security of X25519 itself.
    """
    low, high = sorted((check_node_id(a), check_node_id(b)))
    shared = own_private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = (
        _PAIR_DOMAIN
        + federation_id.encode()
        + b"\x00"
        + struct.pack("<QQQ", server_round, low, high)
    )
    return HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None, info=info).derive(shared)


def pair_sign(own: int, peer: int) -> int:
    """+1 if ``own`` adds the pair's mask (the smaller id), -1 if it subtracts it."""
    return 1 if own < peer else -1


def self_mask_commitment(seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed, published before the seed is shared."""
    return hashlib.sha256(_COMMIT_DOMAIN + seed).digest()


def client_mask(
    length: int,
    modulus: int,
    self_seed: bytes,
    pair_seeds: Sequence[tuple[int, bytes]],
) -> SlotVector:
    """The total mask one client adds: its self mask plus its signed pairwise masks.

    Args:
        length: Slot count of its payload.
        modulus: The plaintext modulus t.
        self_seed: Its self-mask seed ``b_i``.
        pair_seeds: ``(sign, seed)`` per neighbour, sign from :func:`pair_sign`.

    """
    return signed_mask_sum([(1, self_seed), *pair_seeds], length, modulus)


def pair_seeds_of(
    own: int,
    own_secret: bytes,
    peers: Sequence[tuple[int, bytes]],
    federation_id: str,
    server_round: int,
) -> list[tuple[int, bytes]]:
    """``(sign, seed)`` of ``own``'s pairwise masks with each ``(peer, mask public key)``.

    ``own_secret`` is the 16-byte mask-key secret of ``own``: a client's own, or, on the
    server, a dropped client's as rebuilt from shares.
    """
    key = mask_key(own_secret)
    return [
        (pair_sign(own, peer), pairwise_seed(key, pk, federation_id, server_round, own, peer))
        for peer, pk in peers
    ]
