"""A client's side of pairwise masking: keys, shares, masks and the unmask answer.

One round, for a client whose plan turns masking on (``mask_neighbours > 0``):

1. ``train.mask_keys``: it makes two fresh X25519 key pairs (one to agree on masks, one
   to encrypt shares) and a 32-byte self-mask seed, and answers with the public keys and a
   commitment to the seed.
2. ``train.mask_shares``: given the members' public keys, it finds its neighbours in the
   round's graph, Shamir-splits its mask private key and its self-mask seed with the
   plan's threshold, and answers with one sealed pair of shares per neighbour.
3. ``train``: given the members that shared and the shares sealed for it, it opens
   them all (one from every neighbour that shared, or it refuses), trains, and adds its
   self mask and its pairwise masks to the update's slots before encryption.
4. ``train.mask_unmask``: given the survivors and the dropped, it checks that together
   they are exactly the members it masked with, that it is a survivor and that at least
   ``T`` survived; then it reveals, per neighbour, the self-mask share of a survivor or
   the mask-key share of a dropped one, plus the share of its own self-mask seed that it
   kept. It answers one unmask request per round, so it
   never reveals both kinds of share of one peer, and then forgets the round's secrets.

The state between stages lives in the node's Flower ``Context.state`` (in the SuperNode
of a deployment, the simulation's node state in a simulation), like Flower's own
SecAgg+ mod; it holds only this round's fresh secrets and is wiped after the unmask.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from sepals.common.errors import BadSharesError, MaskProtocolError
from sepals.common.mask_prg import SlotVector
from sepals.common.mask_shares import open_shares, seal_shares, split_secret
from sepals.common.masking import (
    check_node_id,
    client_mask,
    graph_seed,
    load_private_key,
    mask_public_key,
    neighbours_of,
    new_key_pair,
    new_secret,
    pack_ids,
    pair_seeds_of,
    private_key_bytes,
    self_mask_commitment,
    unpack_ids,
)
from sepals.common.plan import FederationPlan

KIND_SELF = 0  # the share of a survivor's self-mask seed
KIND_PAIR = 1  # the share of a dropped client's mask private key


@dataclass(frozen=True)
class MaskState:
    """What a client keeps between the masking stages of one round.

    Attributes:
        server_round: The round.
        node: This client's node id.
        stage: The last stage done: ``keys``, ``shares``, ``masked`` or ``unmasked``.
        mask_sk: Hex of the 16-byte secret of the mask-agreement key (empty once unmasked).
        share_sk: Hex of the share-encryption private key (empty once unmasked).
        self_seed: Hex of the self-mask seed (empty once unmasked).
        members: The members whose keys it received (stage 2), ascending.
        mask_pks: Hex mask public keys of ``members``, aligned.
        share_pks: Hex share public keys of ``members``, aligned.
        neighbours: Its neighbours among ``members``.
        sharers: The members that shared (stage 3): the ones it masked with.
        held: Per neighbour that shared, hex of ``(pair share, self share)`` it holds.
        own_share: Hex of the share of its own self-mask seed it keeps (a survivor
            reveals it too, so ``T`` survivors suffice to rebuild a survivor's seed).

    """

    server_round: int
    node: int
    stage: str
    mask_sk: str = ""
    share_sk: str = ""
    self_seed: str = ""
    members: tuple[int, ...] = ()
    mask_pks: tuple[str, ...] = ()
    share_pks: tuple[str, ...] = ()
    neighbours: tuple[int, ...] = ()
    sharers: tuple[int, ...] = ()
    held: tuple[tuple[int, str, str], ...] = ()
    own_share: str = ""

    def to_json(self) -> str:
        """JSON text (kept in the node's context state)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MaskState:
        """Inverse of :meth:`to_json`."""
        raw = json.loads(text)
        for key in ("members", "mask_pks", "share_pks", "neighbours", "sharers"):
            raw[key] = tuple(raw[key])
        raw["held"] = tuple(tuple(h) for h in raw["held"])
        return cls(**raw)


def _ids(values: object, what: str) -> list[int]:
    try:
        nodes = unpack_ids(values)
    except ValueError as exc:
        raise MaskProtocolError(f"{what} is not a packed list of node ids") from exc
    if len(set(nodes)) != len(nodes):
        raise MaskProtocolError(f"{what} repeats a node")
    return nodes


def _blobs(values: object, count: int, what: str) -> list[bytes]:
    if not isinstance(values, list) or len(values) != count:
        raise MaskProtocolError(f"{what} does not match its node list")
    if not all(isinstance(v, bytes) for v in values):
        raise MaskProtocolError(f"{what} holds something that is not bytes")
    return list(values)


def _expect(state: MaskState | None, server_round: int, stage: str) -> MaskState:
    if state is None or state.server_round != server_round:
        raise MaskProtocolError("no masking state for this round")
    if state.stage != stage:
        raise MaskProtocolError(f"masking stage out of order (after {state.stage!r})")
    return state


def new_share_key() -> bytes:
    """A fresh X25519 share-encryption private key (raw bytes), kept by a node for a run."""
    return private_key_bytes(new_key_pair()[0])


def share_public_key(share_sk: bytes) -> bytes:
    """The raw public key of a share-encryption private key."""
    return load_private_key(share_sk).public_key().public_bytes_raw()


def start_round(
    server_round: int, node: int, share_sk: bytes | None = None
) -> tuple[MaskState, dict[str, Any]]:
    """Stage 1: a fresh mask key and self-mask seed; the reply's ``mask`` record.

    ``share_sk`` is the node's share-encryption key for the run; ``None`` makes a fresh
    one for this round.
    """
    mask_secret = new_secret()
    mask_pk = mask_public_key(mask_secret)
    share_key = share_sk if share_sk is not None else new_share_key()
    share_pk = share_public_key(share_key)
    seed = new_secret()
    state = MaskState(
        server_round=server_round,
        node=check_node_id(node),
        stage="keys",
        mask_sk=mask_secret.hex(),
        share_sk=share_key.hex(),
        self_seed=seed.hex(),
    )
    reply = {"mask-pk": mask_pk, "share-pk": share_pk, "commit": self_mask_commitment(seed)}
    return state, reply


def share_secrets(
    plan: FederationPlan, state: MaskState | None, server_round: int, record: Any
) -> tuple[MaskState, dict[str, Any]]:
    """Stage 2: seal shares of the mask key and self-mask seed for every neighbour.

    ``record`` holds ``members`` (node ids) and the aligned ``share-pks`` and, unless the
    mask public keys come with the train message (:func:`setup_round`), ``mask-pks``;
    this client's own keys must be among them, unchanged.
    """
    state = _expect(state, server_round, "keys")
    members = _ids(record.get("members"), "members")
    deferred = "mask-pks" not in record
    mask_pks = [] if deferred else _blobs(record.get("mask-pks"), len(members), "mask-pks")
    share_pks = _blobs(record.get("share-pks"), len(members), "share-pks")
    if state.node not in members:
        raise MaskProtocolError("this client is not among the round's members")
    me = members.index(state.node)
    share_sk = load_private_key(bytes.fromhex(state.share_sk))
    if (
        not deferred and mask_pks[me] != mask_public_key(bytes.fromhex(state.mask_sk))
    ) or share_pks[me] != share_sk.public_key().public_bytes_raw():
        raise MaskProtocolError("the round's member list carries other keys for this client")
    degree = min(plan.mask_neighbours, len(members) - 1)
    if degree < plan.mask_threshold:
        raise MaskProtocolError(
            f"{len(members)} members leave {degree} neighbours, fewer than the threshold "
            f"{plan.mask_threshold}"
        )
    seed = graph_seed(plan.federation_id, server_round)
    neighbours = neighbours_of(state.node, members, degree, seed)
    pair_shares = split_secret(bytes.fromhex(state.mask_sk), plan.mask_threshold, degree)
    # One share of the self-mask seed more than of the mask key: this client keeps it.
    self_shares = split_secret(bytes.fromhex(state.self_seed), plan.mask_threshold, degree + 1)
    sealed = [
        seal_shares(
            share_sk,
            share_pks[members.index(peer)],
            plan.federation_id,
            server_round,
            state.node,
            peer,
            pair_shares[i],
            self_shares[i],
        )
        for i, peer in enumerate(neighbours)
    ]
    order = sorted(range(len(members)), key=lambda i: members[i])
    state = replace(
        state,
        stage="shares",
        members=tuple(members[i] for i in order),
        mask_pks=() if deferred else tuple(mask_pks[i].hex() for i in order),
        share_pks=tuple(share_pks[i].hex() for i in order),
        neighbours=neighbours,
        own_share=self_shares[degree].hex(),
    )
    return state, {"to": pack_ids(neighbours), "sealed": sealed}


def open_and_mask(
    plan: FederationPlan,
    state: MaskState | None,
    server_round: int,
    record: Any,
    slots: int,
    modulus: int,
) -> tuple[MaskState, SlotVector]:
    """Stage 3: open the shares sealed for this client; return its total slot mask.

    ``record`` holds ``sharers`` (the members that shared, this client among them), and
    ``from`` and ``sealed``: one sealed pair of shares from every neighbour that shared;
    with :func:`setup_round`, also ``mask-pks``: those neighbours' mask public keys.
    """
    state = _expect(state, server_round, "shares")
    sharers = _ids(record.get("sharers"), "sharers")
    senders = _ids(record.get("from"), "from")
    sealed = _blobs(record.get("sealed"), len(senders), "sealed")
    members = set(state.members)
    if state.node not in sharers or not set(sharers) <= members:
        raise MaskProtocolError("the sharers are not members of the round, or lack this client")
    if len(sharers) < plan.mask_threshold:
        raise MaskProtocolError(f"{len(sharers)} clients shared, fewer than the threshold")
    expected = sorted(set(state.neighbours) & set(sharers))
    if sorted(senders) != expected:
        raise MaskProtocolError("shares missing from, or sent by, other than the neighbours")
    share_pk = dict(zip(state.members, state.share_pks, strict=True))
    share_sk = load_private_key(bytes.fromhex(state.share_sk))
    held, bad = [], []
    for sender, blob in zip(senders, sealed, strict=True):
        try:
            pair, own = open_shares(
                share_sk,
                bytes.fromhex(share_pk[sender]),
                plan.federation_id,
                server_round,
                sender,
                state.node,
                blob,
            )
        except MaskProtocolError:
            bad.append(sender)
            continue
        held.append((sender, pair.hex(), own.hex()))
    if bad:
        # Refuse the round (nothing is trained) and name who sent what does not open.
        raise BadSharesError(bad)
    if state.mask_pks:
        mask_pk = dict(zip(state.members, state.mask_pks, strict=True))
    else:
        keys = _blobs(record.get("mask-pks"), len(senders), "mask-pks")
        mask_pk = {n: k.hex() for n, k in zip(senders, keys, strict=True)}
    pairs = pair_seeds_of(
        state.node,
        bytes.fromhex(state.mask_sk),
        [(peer, bytes.fromhex(mask_pk[peer])) for peer in expected],
        plan.federation_id,
        server_round,
    )
    mask = client_mask(slots, modulus, bytes.fromhex(state.self_seed), pairs)
    state = replace(state, stage="masked", sharers=tuple(sorted(sharers)), held=tuple(held))
    return state, mask


def reveal_shares(
    plan: FederationPlan, state: MaskState | None, server_round: int, record: Any
) -> tuple[MaskState, dict[str, Any]]:
    """Stage 4: reveal one share per neighbour, of the kind its fate calls for; once.

    ``record`` holds ``survivors`` and ``dropped``. Refused (nothing revealed) unless the
    two are disjoint, together exactly the members this client masked with, hold this
    client among the survivors, and count at least ``T`` survivors; and refused for any
    second request in the round.
    """
    if state is not None and state.server_round == server_round and state.stage == "unmasked":
        raise MaskProtocolError("shares of this round were already revealed")
    state = _expect(state, server_round, "masked")
    survivors = set(_ids(record.get("survivors"), "survivors"))
    dropped = set(_ids(record.get("dropped"), "dropped"))
    if survivors & dropped:
        raise MaskProtocolError("a client is named both survivor and dropped")
    if survivors | dropped != set(state.sharers):
        raise MaskProtocolError("survivors and dropped are not the clients this one masked with")
    if state.node not in survivors:
        raise MaskProtocolError("this client is not among the survivors")
    if len(survivors) < plan.mask_threshold:
        raise MaskProtocolError(f"{len(survivors)} survivors, fewer than the threshold")
    peers, kinds, shares = [state.node], [KIND_SELF], [bytes.fromhex(state.own_share)]
    for peer, pair, own in state.held:
        peers.append(peer)
        if peer in survivors:
            kinds.append(KIND_SELF)
            shares.append(bytes.fromhex(own))
        else:
            kinds.append(KIND_PAIR)
            shares.append(bytes.fromhex(pair))
    # Forget every secret of the round; remember only that it was answered.
    done = MaskState(server_round=server_round, node=state.node, stage="unmasked")
    return done, {"peers": pack_ids(peers), "kinds": kinds, "shares": shares}


def setup_round(
    plan: FederationPlan, server_round: int, node: int, share_sk: bytes, record: Any
) -> tuple[MaskState, dict[str, Any]]:
    """Stages 1 and 2 in one exchange, with the node's share key for the run.

    ``record`` holds ``members`` and their registered ``share-pks`` (this node's must be
    its own); the reply carries the fresh mask public key, the self-mask commitment and
    the sealed shares. The members' mask public keys come later, with the train message.
    """
    state, keys = start_round(server_round, node, share_sk)
    state, shares = share_secrets(plan, state, server_round, record)
    return state, {**keys, **shares}
