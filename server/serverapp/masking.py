"""The server's side of pairwise masking: relay keys and shares, rebuild, unmask.

:class:`MaskRound` holds one round's masking state on the server. It sees public keys,
commitments, sealed shares it cannot open, and, after the uploads, the shares that
survivors reveal: enough to rebuild the self-mask seeds of the clients that uploaded and
the mask keys of the ones that dropped, never both for one client. From those it computes
the slot offset (minus the self masks, minus the pairwise masks that dropped clients left
uncancelled) that the BFV codec adds to the sum as a plaintext; it never sees an update.

Every rebuilt secret is checked against what its owner published before the uploads (the
mask public key; a SHA-256 commitment to the self-mask seed), so wrong shares make the
round fail with a clear reason instead of corrupting the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sepals.common.errors import MaskProtocolError
from sepals.common.mask_prg import SlotVector, mask_threads, signed_mask_sum
from sepals.common.mask_shares import SHARE_BYTES, combine_secrets
from sepals.common.masking import (
    MaskParams,
    check_node_id,
    graph_seed,
    mask_public_key,
    neighbour_graph,
    pack_ids,
    pair_seeds_of,
    self_mask_commitment,
    unpack_ids,
)

KIND_SELF = 0
KIND_PAIR = 1
_KEY_BYTES = 32
#: Slots from which the offset is expanded with the compiled pass: below, its set-up
#: (numba's load, about 0.3 s once a process) costs more than it saves.
FUSED_MIN_SLOTS = 1 << 16


class MaskRoundAbandoned(MaskProtocolError):
    """The round's masks cannot be removed; nothing of it is aggregated."""


def _bytes32(record: Mapping[str, Any], key: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes) or len(value) != _KEY_BYTES:
        raise MaskProtocolError(f"'{key}' must be {_KEY_BYTES} bytes")
    return value


@dataclass
class MaskRound:
    """One round's masking, driven by the strategy stage by stage.

    Args:
        params: The plan's degree and threshold.
        federation_id: The plan's federation id (it seeds the graph).
        server_round: The federation round.

    """

    params: MaskParams
    federation_id: str
    server_round: int
    keys: dict[int, tuple[bytes, bytes, bytes]] = field(default_factory=dict)
    graph: dict[int, tuple[int, ...]] = field(default_factory=dict)
    sealed: dict[int, dict[int, bytes]] = field(default_factory=dict)
    sharers: tuple[int, ...] = ()
    survivors: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()
    revealed: dict[tuple[int, int], list[bytes]] = field(default_factory=dict)
    revealers: set[int] = field(default_factory=set)
    _registered: dict[int, bytes] = field(default_factory=dict)

    # ------------------------------------------------------------------ stage 1
    def admit_keys(self, node: int, record: Mapping[str, Any]) -> None:
        """Record a client's public keys and commitment (its stage-1 reply)."""
        check_node_id(node)
        if node in self.keys:
            raise MaskProtocolError("second key reply from the same node")
        mask_pk = _bytes32(record, "mask-pk")
        share_pk = _bytes32(record, "share-pk")
        commit = _bytes32(record, "commit")
        if mask_pk == share_pk or any(mask_pk in (k[0], k[1]) for k in self.keys.values()):
            raise MaskProtocolError("public key reused")
        self.keys[node] = (mask_pk, share_pk, commit)

    @property
    def members(self) -> list[int]:
        """The clients whose keys arrived (stage 1's survivors), ascending."""
        return sorted(self.keys)

    def members_record(self) -> dict[str, Any]:
        """Stage 2's message body, the same for every member; fixes the round's graph."""
        members = self.members
        degree = self.params.degree(len(members))
        self.graph = neighbour_graph(
            members, degree, graph_seed(self.federation_id, self.server_round)
        )
        return {
            "members": pack_ids(members),
            "mask-pks": [self.keys[n][0] for n in members],
            "share-pks": [self.keys[n][1] for n in members],
        }

    # ------------------------------------------------------------- stages 1 + 2
    def start(self, share_pks: Mapping[int, bytes]) -> dict[str, Any]:
        """Open a one-exchange setup among ``share_pks``' nodes (see :meth:`admit_setup`).

        The members are the nodes with a registered share key for the run; the graph is
        fixed over them now. Returns the setup message body, the same for every member.
        """
        members = sorted(share_pks)
        self._registered = dict(share_pks)
        self.graph = neighbour_graph(
            members,
            self.params.degree(len(members)),
            graph_seed(self.federation_id, self.server_round),
        )
        return {
            "members": pack_ids(members),
            "share-pks": [share_pks[n] for n in members],
        }

    def admit_setup(self, node: int, record: Mapping[str, Any]) -> None:
        """Record a member's fresh mask key, commitment and sealed shares at once."""
        if node not in self.graph:
            raise MaskProtocolError("setup reply from a node that is not a member")
        if record.get("share-pk") != self._registered.get(node):
            raise MaskProtocolError("setup reply under another share key than registered")
        self.admit_shares(node, record)
        try:
            self.admit_keys(node, record)
        except MaskProtocolError:
            del self.sealed[node]
            raise

    # ------------------------------------------------------------------ stage 2
    def admit_shares(self, node: int, record: Mapping[str, Any]) -> None:
        """Record the sealed shares a member sent (its stage-2 reply)."""
        if node not in self.graph:
            raise MaskProtocolError("shares from a node that is not a member")
        if node in self.sealed:
            raise MaskProtocolError("second share reply from the same node")
        sealed = record.get("sealed")
        try:
            to = unpack_ids(record.get("to"))
        except ValueError as exc:
            raise MaskProtocolError("malformed share reply") from exc
        if not isinstance(sealed, list) or len(to) != len(sealed):
            raise MaskProtocolError("malformed share reply")
        if sorted(to) != list(self.graph[node]) or len(set(to)) != len(to):
            raise MaskProtocolError("shares not addressed to exactly the node's neighbours")
        if not all(isinstance(b, bytes) and 0 < len(b) <= 1024 for b in sealed):
            raise MaskProtocolError("malformed sealed share")
        self.sealed[node] = dict(zip(to, sealed, strict=True))

    def close_sharing(self) -> tuple[int, ...]:
        """Fix the sharers: members that shared and keep ``T`` sharing neighbours.

        A client with fewer than ``T`` neighbours among the sharers could not have its
        secret rebuilt; it is left out (repeatedly, since that can thin others' counts).
        """
        sharers = set(self.sealed)
        t = self.params.threshold
        while True:
            thin = {n for n in sharers if len(set(self.graph[n]) & sharers) < t}
            if not thin:
                break
            sharers -= thin
        self.sharers = tuple(sorted(sharers))
        return self.sharers

    def train_record(self, node: int) -> dict[str, Any]:
        """The masking part of ``node``'s train message: sharers and its sealed shares."""
        senders = [p for p in self.graph[node] if p in self.sharers]
        return {
            "sharers": pack_ids(self.sharers),
            "from": pack_ids(senders),
            "sealed": [self.sealed[p][node] for p in senders],
            "mask-pks": [self.keys[p][0] for p in senders],
        }

    # ------------------------------------------------------------------ stage 4
    def unmask_record(self, uploaded: Iterable[int]) -> dict[str, Any]:
        """Stage 4's message body: who uploaded (survivors) and who did not (dropped)."""
        done = set(uploaded)
        self.survivors = tuple(n for n in self.sharers if n in done)
        self.dropped = tuple(n for n in self.sharers if n not in done)
        return {
            "round": self.server_round,
            "survivors": pack_ids(self.survivors),
            "dropped": pack_ids(self.dropped),
        }

    def admit_reveal(self, node: int, record: Mapping[str, Any]) -> None:
        """Record the shares a survivor revealed (its stage-4 reply)."""
        if node not in self.survivors:
            raise MaskProtocolError("revealed shares from a node that is not a survivor")
        if node in self.revealers:
            raise MaskProtocolError("second reveal from the same node")
        kinds, shares = record.get("kinds"), record.get("shares")
        try:
            peers = unpack_ids(record.get("peers"))
        except ValueError as exc:
            raise MaskProtocolError("malformed reveal") from exc
        if not (
            isinstance(kinds, list)
            and isinstance(shares, list)
            and len(peers) == len(kinds) == len(shares)
            and all(isinstance(x, bytes) for x in shares)
        ):
            raise MaskProtocolError("malformed reveal")
        expected = sorted([node, *(p for p in self.graph[node] if p in self.sharers)])
        if sorted(peers) != expected:
            raise MaskProtocolError("reveal does not cover exactly the node and its neighbours")
        survivors = set(self.survivors)
        for peer, kind in zip(peers, kinds, strict=True):
            if kind != (KIND_SELF if peer in survivors else KIND_PAIR):
                raise MaskProtocolError("revealed a share of the wrong kind")
        for peer, share in zip(peers, shares, strict=True):
            # ``peer`` gave its neighbours shares 1, 2, ... in ascending id order and kept
            # the next one of its self-mask seed.
            index = len(self.graph[node]) + 1 if peer == node else self.graph[peer].index(node) + 1
            if (
                not isinstance(share, bytes)
                or len(share) != SHARE_BYTES
                or int.from_bytes(share[:2], "little") != index
            ):
                raise MaskProtocolError("revealed share is malformed or not the one it holds")
        self.revealers.add(node)
        for peer, kind, share in zip(peers, kinds, shares, strict=True):
            self.revealed.setdefault((peer, kind), []).append(share)

    def _shares_of(self, node: int, kind: int) -> list[bytes]:
        shares = self.revealed.get((node, kind), [])
        t = self.params.threshold
        if len(shares) < t:
            what = "self-mask seed" if kind == KIND_SELF else "mask key"
            raise MaskRoundAbandoned(
                f"{len(shares)} shares of the {what} of node {node} arrived, {t} needed"
            )
        return shares

    def _checked(self, node: int, kind: int, secret: bytes) -> bytes:
        mask_pk, _, commit = self.keys[node]
        if kind == KIND_SELF and self_mask_commitment(secret) != commit:
            raise MaskRoundAbandoned(f"shares of node {node} rebuild a wrong self-mask seed")
        if kind == KIND_PAIR and mask_public_key(secret) != mask_pk:
            raise MaskRoundAbandoned(f"shares of node {node} rebuild a wrong mask key")
        return secret

    def slot_offset(self, slots: int, modulus: int) -> SlotVector:
        """What the server adds to the survivors' sum: every leftover mask, negated.

        All the secrets are rebuilt in one batch (:func:`combine_secrets`); a round
        nobody dropped from rebuilds and expands only the survivors' self masks. The
        masks are expanded on every usable core (:func:`mask_threads`), a large model's
        with the compiled pass.

        Raises:
            MaskRoundAbandoned: a secret cannot be rebuilt (too few shares, or shares that
                rebuild something other than what its owner committed to).

        """
        if len(self.survivors) < self.params.threshold:
            raise MaskRoundAbandoned(
                f"{len(self.survivors)} survivors, fewer than the threshold {self.params.threshold}"
            )
        jobs = [(n, KIND_SELF) for n in self.survivors] + [(d, KIND_PAIR) for d in self.dropped]
        share_sets = [self._shares_of(n, kind) for n, kind in jobs]
        try:
            secrets = combine_secrets(share_sets, self.params.threshold)
        except MaskProtocolError as exc:
            raise MaskRoundAbandoned(f"revealed shares do not combine: {exc}") from exc
        terms: list[tuple[int, bytes]] = []
        survivors = set(self.survivors)
        for (node, kind), secret in zip(jobs, secrets, strict=True):
            secret = self._checked(node, kind, secret)
            if kind == KIND_SELF:
                terms.append((-1, secret))
                continue
            peers = [(j, self.keys[j][0]) for j in self.graph[node] if j in survivors]
            # Survivor j added -sign * mask (its sign is the opposite of the dropped
            # client's), so adding sign * mask removes it.
            terms.extend(pair_seeds_of(node, secret, peers, self.federation_id, self.server_round))
        return signed_mask_sum(
            terms, slots, modulus, workers=mask_threads(), fused=slots >= FUSED_MIN_SLOTS
        )
