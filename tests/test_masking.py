"""Pairwise masking under BFV, at the protocol level: no Flower, no Ray.

Covers: exact sums with dropouts up to the threshold and abandonment one beyond it;
what a colluding server plus one client (which holds the shared BFV key) sees of another
client's upload; the client's refusals in the unmask stage; tampered shares and replies;
properties of the graph, the Shamir sharing and the PRG; and known answers that pin the
mask derivation shared by simulation and deployment (both import these functions).

Statistical tests reject at ``ALPHA = 1e-9``. The masks come from ``os.urandom``, so a
uniform upload fails such a test with probability about 1e-9 per assertion, while every
one of them is also run on an unmasked control that it must reject.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import galois
import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare, ks_2samp

from sepals.client import masking as cm
from sepals.common.bfv import BfvCodec
from sepals.common.config import EncryptionConfig
from sepals.common.errors import BadSharesError, MaskProtocolError, SepalsError
from sepals.common.mask_prg import (
    CHUNK_WORDS,
    MaskSum,
    SlotVector,
    add_mod,
    mask_vector,
    signed_mask_sum,
    sub_mod,
)
from sepals.common.mask_shares import (
    combine_secret,
    combine_secrets,
    open_shares,
    seal_shares,
    split_secret,
)
from sepals.common.masking import (
    MaskParams,
    client_mask,
    default_neighbours,
    default_threshold,
    graph_seed,
    load_private_key,
    mask_key,
    mask_public_key,
    neighbour_graph,
    neighbours_of,
    new_key_pair,
    new_secret,
    pack_ids,
    pair_seeds_of,
    pair_sign,
    pairwise_seed,
    resolve_mask_params,
    self_mask_commitment,
    unpack_ids,
)
from sepals.common.plan import FederationPlan
from sepals.server.serverapp.masking import KIND_PAIR, KIND_SELF, MaskRound, MaskRoundAbandoned

CFG = EncryptionConfig()
PER_CT = CFG.values_per_ciphertext
FED = "a" * 32
ROUND = 2
OPERATOR_KEY = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
ALPHA = 1e-9
BINS = 64
# Protocol-only tests (no BFV) mask a few slots modulo a prime of BFV's size.
SMALL_SLOTS = 64
SMALL_T = 17592186028033  # a 44-bit prime, as the default BFV plaintext modulus


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def codecs(bfv_keys: tuple[bytes, bytes]) -> tuple[BfvCodec, BfvCodec]:
    """The clients' codec (secret key) and the server's (public key), one key per session."""
    secret, public = bfv_keys
    return BfvCodec.for_client(secret, CFG), BfvCodec.for_server(public, CFG)


def make_plan(params: MaskParams, federation_id: str = FED) -> FederationPlan:
    return FederationPlan(
        federation_id=federation_id,
        rounds=3,
        fraction_train=1.0,
        local_epochs=1,
        batch_size=8,
        learning_rate=0.1,
        lr_schedule="constant",
        momentum=0.0,
        model_seed=0,
        codec="bfv-q2",
        key_fingerprint="0" * 32,
        vector_length=PER_CT,
        operator_key=OPERATOR_KEY,
        mask_neighbours=params.neighbours,
        mask_threshold=params.threshold,
    )


@dataclass
class Run:
    """One round driven through stages 1-3 (keys, shares, masked uploads)."""

    plan: FederationPlan
    server: MaskRound
    nodes: list[int]
    states: dict[int, cm.MaskState]
    masks: dict[int, SlotVector]
    slots: int
    modulus: int

    @property
    def t(self) -> int:
        return self.plan.mask_threshold

    def neighbours(self, node: int) -> set[int]:
        return set(self.server.graph[node])


def start(
    n: int,
    neighbours: int | None = None,
    threshold: int | None = None,
    *,
    slots: int = SMALL_SLOTS,
    modulus: int = SMALL_T,
    silent: tuple[int, ...] = (),
) -> Run:
    """Run stages 1-3 for ``n`` clients; those at indices ``silent`` never send shares."""
    params = resolve_mask_params(n, neighbours, threshold)
    plan = make_plan(params)
    nodes = [1000 + 7 * i for i in range(n)]
    server = MaskRound(params, FED, ROUND)
    states: dict[int, cm.MaskState] = {}
    for node in nodes:
        states[node], reply = cm.start_round(ROUND, node)
        server.admit_keys(node, reply)
    members = server.members_record()
    for i, node in enumerate(nodes):
        states[node], reply = cm.share_secrets(plan, states[node], ROUND, members)
        if i not in silent:
            server.admit_shares(node, reply)
    server.close_sharing()
    masks = {}
    for node in server.sharers:
        states[node], masks[node] = cm.open_and_mask(
            plan, states[node], ROUND, server.train_record(node), slots, modulus
        )
    return Run(plan, server, nodes, states, masks, slots, modulus)


def unmask(run: Run, uploaded: list[int]) -> dict[str, Any]:
    """Stage 4: every survivor reveals its shares (or, below ``T`` survivors, refuses)."""
    record = run.server.unmask_record(uploaded)
    for node in run.server.survivors:
        if len(run.server.survivors) < run.t:
            with pytest.raises(MaskProtocolError, match="fewer than the threshold"):
                cm.reveal_shares(run.plan, run.states[node], ROUND, record)
            continue
        run.states[node], reply = cm.reveal_shares(run.plan, run.states[node], ROUND, record)
        run.server.admit_reveal(node, reply)
    return record


def recoverable(run: Run, dropped: set[int]) -> bool:
    """Whether every secret the server needs has ``T`` shares among the survivors.

    A survivor's self-mask seed is held by its neighbours and by itself (it kept one
    share and reveals it); a dropped client's mask key only by its neighbours.
    """
    sharers = set(run.server.sharers)
    survivors = sharers - dropped
    if len(survivors) < run.t:
        return False
    return all(
        len((run.neighbours(n) | {n}) & survivors) >= run.t
        if n in survivors
        else len(run.neighbours(n) & survivors) >= run.t
        for n in sharers
    )


def slot_residues(codec: BfvCodec, payload: bytes) -> SlotVector:
    """Decrypt one upload to its raw slot residues in ``[0, t)`` (what a colluder sees)."""
    import tenseal.sealapi as seal

    rows = []
    for ct in codec.validate(payload):
        plain = seal.Plaintext()
        codec._decryptor.decrypt(ct, plain)
        rows.append(np.asarray(codec._encoder.decode_uint64(plain), dtype=np.uint64))
    return np.concatenate(rows)


def chi2_uniform_p(residues: SlotVector, modulus: int) -> float:
    """p-value of a chi-square test of uniformity over ``BINS`` equal bins of ``[0, t)``."""
    bins = (residues.astype(object) * BINS // modulus).astype(np.int64)
    counts = np.bincount(bins, minlength=BINS)
    assert counts.size == BINS
    return float(chisquare(counts).pvalue)


# ---------------------------------------------------------------------- 1. exact sums
def _drops(run: Run, case: str) -> list[int]:
    first = run.nodes[0]
    if case == "none":
        return []
    if case == "one":
        return [first]
    # A survivor's self-mask seed has k + 1 holders (its neighbours and itself), a dropped
    # client's mask key k (its neighbours); each needs T of them among the survivors.
    complete = len(run.nodes) - 1 <= run.plan.mask_neighbours
    if case == "limit":
        if complete:
            # Every survivor's seed keeps exactly T holders: k + 1 - T may drop.
            return run.nodes[: run.plan.mask_neighbours + 1 - run.t]
        # k - T = 1: the first's mask key keeps exactly T surviving holders; the
        # survivors next to both lose k + 1 - T = 2 holders of their seeds at most.
        assert run.plan.mask_neighbours - run.t == 1
        return [first, min(run.neighbours(first))]
    if case == "beyond":
        if complete:
            # T - 1 survivors: none of the survivors' seeds can be rebuilt.
            return run.nodes[: run.plan.mask_neighbours + 2 - run.t]
        # The first's mask key keeps only T - 1 surviving holders.
        return [first, *sorted(run.neighbours(first))[:2]]
    raise AssertionError(case)


# complete-10: k = 9, T = 7 (three may drop); ring-12-k4: T = 3 (two next to each other).
GRAPHS = {"complete-10": (10, None), "ring-12-k4": (12, 4)}
LIMIT_DROPS = {"complete-10": 3, "ring-12-k4": 2}


@pytest.mark.parametrize("graph", sorted(GRAPHS))
@pytest.mark.parametrize("case", ["none", "one", "limit"])
def test_masked_sum_equals_unmasked_sum(
    codecs: tuple[BfvCodec, BfvCodec], graph: str, case: str
) -> None:
    client, server = codecs
    n, k = GRAPHS[graph]
    length = 3000
    slots = client.slot_count(length)
    run = start(n, k, slots=slots, modulus=client.plain_modulus)
    if graph == "ring-12-k4":
        assert run.plan.mask_neighbours == 4 and run.t == 3
        assert all(len(run.neighbours(x)) == 4 for x in run.nodes)
    else:
        assert run.plan.mask_neighbours == 9 and run.t == 7
        assert all(len(run.neighbours(x)) == n - 1 for x in run.nodes)
    dropped = _drops(run, case)
    assert len(dropped) == {"none": 0, "one": 1, "limit": LIMIT_DROPS[graph]}[case]
    assert recoverable(run, set(dropped))
    rng = np.random.default_rng(n)
    loaded, ints = [], []
    for i, node in enumerate(run.nodes):
        x = rng.normal(0.0, 3.0, length)
        payload, _ = client.encode_update(x, np.random.default_rng(i), slot_mask=run.masks[node])
        if node not in dropped:
            loaded.append(server.validate(payload, length))
            ints.append(client.quantize(x, np.random.default_rng(i))[0])
    uploaded = [x for x in run.nodes if x not in dropped]
    unmask(run, uploaded)
    assert run.server.dropped == tuple(sorted(dropped))
    offset = run.server.slot_offset(slots, client.plain_modulus)
    total = client.integer_sum(server.aggregate_loaded(loaded, length, offset))
    assert total.tolist() == np.sum(ints, axis=0).tolist()
    # Without the offset the masks stay: the sum is garbage (so the test above can fail).
    raw = client.integer_sum(server.aggregate_loaded(loaded, length))
    assert raw.tolist() != total.tolist()


def test_the_offset_is_the_same_on_the_compiled_pass_and_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A large model's offset path (compiled pass, several threads) removes the same masks."""
    import sepals.server.serverapp.masking as sm

    run = start(*GRAPHS["ring-12-k4"])
    dropped = _drops(run, "limit")
    unmask(run, [x for x in run.nodes if x not in dropped])
    monkeypatch.setattr(sm, "mask_threads", lambda: 1)
    plain = run.server.slot_offset(run.slots, run.modulus)
    monkeypatch.setattr(sm, "FUSED_MIN_SLOTS", 1)
    monkeypatch.setattr(sm, "mask_threads", lambda: 3)
    fast = run.server.slot_offset(run.slots, run.modulus)
    assert np.array_equal(fast, plain)
    for node in run.server.survivors:
        add_mod(fast, run.masks[node], run.modulus)
    assert not fast.any()


@pytest.mark.parametrize("case", ["none", "one", "limit"])
def test_the_server_expands_only_the_masks_left_in_the_sum(
    monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """One PRG vector per survivor's self mask, plus one per dropped-survivor pair; no more.

    A round nobody dropped from rebuilds no mask key and expands no pairwise mask.
    """
    import sepals.server.serverapp.masking as sm

    run = start(*GRAPHS["ring-12-k4"])
    dropped = _drops(run, case)
    unmask(run, [x for x in run.nodes if x not in dropped])
    expanded: list[bytes] = []
    rebuilt: list[int] = []

    def counting_sum(
        terms: list[tuple[int, bytes]], length: int, modulus: int, **options: Any
    ) -> SlotVector:
        expanded.extend(seed for _, seed in terms)
        return signed_mask_sum(terms, length, modulus, **options)

    def counting_combine(share_sets: list[list[bytes]], threshold: int) -> list[bytes]:
        rebuilt.append(len(share_sets))
        return combine_secrets(share_sets, threshold)

    monkeypatch.setattr(sm, "signed_mask_sum", counting_sum)
    monkeypatch.setattr(sm, "combine_secrets", counting_combine)
    offset = run.server.slot_offset(run.slots, run.modulus)
    survivors = set(run.server.survivors)
    pairs = sum(len(run.neighbours(d) & survivors) for d in dropped)
    assert len(expanded) == len(survivors) + pairs
    assert rebuilt == [len(survivors) + len(dropped)]
    if case == "none":
        assert pairs == 0 and len(expanded) == len(run.nodes)
    for node in survivors:
        add_mod(offset, run.masks[node], run.modulus)
    assert not offset.any()


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_one_dropout_beyond_the_limit_abandons_the_round(graph: str) -> None:
    n, k = GRAPHS[graph]
    run = start(n, k)
    dropped = _drops(run, "beyond")
    assert not recoverable(run, set(dropped))
    unmask(run, [x for x in run.nodes if x not in dropped])
    with pytest.raises(MaskRoundAbandoned):
        run.server.slot_offset(run.slots, run.modulus)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 12),
    k=st.sampled_from([2, 4, 6, None]),
    data=st.data(),
)
def test_masks_and_offset_cancel_for_any_dropouts(n: int, k: int | None, data: Any) -> None:
    """Protocol level: survivors' masks plus the offset vanish, or the round is abandoned."""
    if k is not None and k >= n - 1:
        k = None
    degree = resolve_mask_params(n, k).degree(n)
    threshold = data.draw(st.integers(1, degree), label="threshold")
    run = start(n, k, threshold)
    dropped = set(data.draw(st.sets(st.sampled_from(run.nodes), max_size=n // 2), label="drop"))
    unmask(run, [x for x in run.nodes if x not in dropped])
    if not recoverable(run, dropped):
        event("abandoned")
        with pytest.raises(MaskRoundAbandoned):
            run.server.slot_offset(run.slots, run.modulus)
        return
    event("unmasked with dropouts" if dropped else "unmasked")
    total = run.server.slot_offset(run.slots, run.modulus)
    for node in run.server.survivors:
        add_mod(total, run.masks[node], run.modulus)
    assert not total.any()


def test_a_client_that_never_shares_is_left_out_and_the_sum_stays_exact() -> None:
    run = start(6, silent=(2,))
    silent = run.nodes[2]
    assert silent not in run.server.sharers and silent not in run.masks
    unmask(run, list(run.server.sharers))
    total = run.server.slot_offset(run.slots, run.modulus)
    for node in run.server.survivors:
        add_mod(total, run.masks[node], run.modulus)
    assert not total.any()


# ---------------------------------------------------------------------- 2. collusion
def test_colluding_server_and_client_see_uniform_residues(
    codecs: tuple[BfvCodec, BfvCodec],
) -> None:
    """The colluder holds the BFV secret key: it decrypts the victim's upload to noise."""
    client, _ = codecs
    t = client.plain_modulus
    slots = client.slot_count(PER_CT)
    run = start(6, slots=slots, modulus=t)
    victim, colluder = run.nodes[0], run.nodes[1]
    x = np.random.default_rng(7).normal(0.0, 2.0, PER_CT)
    masked, _ = client.encode_update(x, np.random.default_rng(1), slot_mask=run.masks[victim])
    plain, _ = client.encode_update(x, np.random.default_rng(1))
    seen = slot_residues(client, masked)
    clear = slot_residues(client, plain)
    assert seen.size == slots
    # The helper decrypts what encode_update says: packed residues plus the mask.
    expected = clear.copy()
    add_mod(expected, run.masks[victim], t)
    assert np.array_equal(seen, expected)

    assert chi2_uniform_p(seen, t) > ALPHA
    assert chi2_uniform_p(clear, t) < ALPHA  # the same test sees through no mask

    # After the unmask stage the server has rebuilt the victim's self-mask seed, and the
    # colluder knows its own pairwise seed with the victim: removing both still leaves
    # the pairwise masks of the victim's honest neighbours.
    secrets = {n: bytes.fromhex(run.states[n].mask_sk) for n in run.nodes}
    victim_pk = run.server.keys[victim][0]

    def remove_pair_mask(acc: SlotVector, peer: int) -> None:
        [(sign, seed)] = pair_seeds_of(peer, secrets[peer], [(victim, victim_pk)], FED, ROUND)
        # The victim added the opposite of the peer's sign times this mask.
        (add_mod if sign > 0 else sub_mod)(acc, mask_vector(seed, slots, t), t)

    unmask(run, run.nodes)
    self_seed = combine_secret(run.server.revealed[(victim, KIND_SELF)], run.t)
    assert self_mask_commitment(self_seed) == run.server.keys[victim][2]
    peeled = seen.copy()
    sub_mod(peeled, mask_vector(self_seed, slots, t), t)
    remove_pair_mask(peeled, colluder)
    assert chi2_uniform_p(peeled, t) > ALPHA
    # Control: with every neighbour's secret (all n - 1 > T - 1 of them colluding) the
    # upload opens to the plain residues, so the uniformity above is the masks' doing.
    assert run.neighbours(victim) == set(run.nodes[1:])
    for peer in run.nodes[2:]:
        remove_pair_mask(peeled, peer)
    assert np.array_equal(peeled, clear)


def test_fixed_and_different_inputs_are_indistinguishable(
    codecs: tuple[BfvCodec, BfvCodec],
) -> None:
    client, _ = codecs
    t = client.plain_modulus
    slots = client.slot_count(PER_CT)
    run = start(6, slots=slots, modulus=t)
    a, b = run.nodes[0], run.nodes[3]
    fixed = np.full(PER_CT, 0.5)
    other = np.random.default_rng(3).normal(0.0, 3.0, PER_CT)
    seen_fixed, _ = client.encode_update(fixed, np.random.default_rng(1), slot_mask=run.masks[a])
    seen_other, _ = client.encode_update(other, np.random.default_rng(2), slot_mask=run.masks[b])
    p_masked = ks_2samp(
        slot_residues(client, seen_fixed).astype(np.float64),
        slot_residues(client, seen_other).astype(np.float64),
    ).pvalue
    assert p_masked > ALPHA
    clear_fixed, _ = client.encode_update(fixed, np.random.default_rng(1))
    clear_other, _ = client.encode_update(other, np.random.default_rng(2))
    p_clear = ks_2samp(
        slot_residues(client, clear_fixed).astype(np.float64),
        slot_residues(client, clear_other).astype(np.float64),
    ).pvalue
    assert p_clear < ALPHA


def _lying_server_attack(colluding: int, told_survived: int) -> tuple[Run, int, bytes | None]:
    """A server that tells clients different survivor sets, against the victim ``nodes[0]``.

    Complete graph of six (k = 5, T = 4). The victim uploaded and is told it survived (so
    it reveals its own kept share); ``colluding`` neighbours hand over both shares they
    hold of it; of the honest neighbours, ``told_survived`` are told it survived (they
    reveal its self-mask share), the rest that it dropped (they reveal its mask-key
    share). Returns the victim's total mask if the server could rebuild it, else None.
    """
    run = start(6)
    victim, *neighbours = run.nodes
    colluders, honest = neighbours[:colluding], neighbours[colluding:]
    survived = _request(run, run.nodes, [])
    dropped = _request(run, run.nodes[1:], [victim])
    got: dict[int, list[bytes]] = {KIND_SELF: [], KIND_PAIR: []}
    for c in colluders:
        [(pair, own)] = [(p, o) for sender, p, o in run.states[c].held if sender == victim]
        got[KIND_PAIR].append(bytes.fromhex(pair))
        got[KIND_SELF].append(bytes.fromhex(own))
    for i, node in enumerate([victim, *honest]):
        record = survived if i <= told_survived else dropped
        _, reply = cm.reveal_shares(run.plan, run.states[node], ROUND, record)
        at = unpack_ids(reply["peers"]).index(victim)
        got[reply["kinds"][at]].append(reply["shares"][at])
    if min(len(got[KIND_SELF]), len(got[KIND_PAIR])) < run.t:
        return run, victim, None
    seed = combine_secret(got[KIND_SELF], run.t)
    key = combine_secret(got[KIND_PAIR], run.t)
    assert self_mask_commitment(seed) == run.server.keys[victim][2]
    assert mask_public_key(key) == run.server.keys[victim][0]
    peers = [(j, run.server.keys[j][0]) for j in run.server.graph[victim]]
    pairs = pair_seeds_of(victim, key, peers, FED, ROUND)
    return run, victim, client_mask(run.slots, run.modulus, seed, pairs)


def test_a_lying_server_needs_2t_at_most_k_plus_1_plus_c() -> None:
    """Without a consistency round, C colluders suffice when 2T <= k + 1 + C (README).

    The victim's own kept share is one more self-mask share the server can ask for, so
    the bound is one weaker than SecAgg+'s 2T > k + C: here k = 5, T = 4, and C = 2
    colluding neighbours (2T > k + C holds) let the server rebuild the victim's whole
    mask, hence its update; with C = 1 no split of the honest neighbours does.
    """
    run, victim, mask = _lying_server_attack(colluding=2, told_survived=1)
    assert (run.plan.mask_neighbours, run.t) == (5, 4)
    assert mask is not None and np.array_equal(mask, run.masks[victim])
    for told in range(5):  # one colluder, four honest neighbours: every split fails
        assert _lying_server_attack(colluding=1, told_survived=told)[2] is None


# ---------------------------------------------------------------------- 3. refusals
@pytest.fixture
def masked_round() -> Run:
    """Six clients, complete graph (k = 5, T = 4), all masked; nothing revealed yet."""
    return start(6)


def _request(run: Run, survivors: list[int], dropped: list[int]) -> dict[str, Any]:
    return {"survivors": pack_ids(survivors), "dropped": pack_ids(dropped)}


def test_a_second_unmask_request_is_refused(masked_round: Run) -> None:
    run = masked_round
    me, peer = run.nodes[0], run.nodes[1]
    state = run.states[me]
    first = _request(run, [x for x in run.nodes if x != peer], [peer])
    done, reply = cm.reveal_shares(run.plan, state, ROUND, first)
    assert reply["kinds"][unpack_ids(reply["peers"]).index(peer)] == cm.KIND_PAIR
    assert done.mask_sk == done.self_seed == "" and done.held == ()
    # The other split would reveal the self-mask share of the same peer: refused.
    second = _request(run, list(run.nodes), [])
    with pytest.raises(MaskProtocolError, match="already revealed"):
        cm.reveal_shares(run.plan, done, ROUND, second)
    with pytest.raises(MaskProtocolError, match="already revealed"):
        cm.reveal_shares(run.plan, done, ROUND, first)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("missing-sharer", "not the clients this one masked with"),
        ("stranger", "not the clients this one masked with"),
        ("both", "both survivor and dropped"),
        ("self-dropped", "not among the survivors"),
        ("too-few", "fewer than the threshold"),
        ("repeated", "repeats a node"),
        ("not-packed-list", "not a packed list of node ids"),
        ("not-packed-length", "not a packed list of node ids"),
        ("not-packed-missing", "not a packed list of node ids"),
    ],
)
def test_inconsistent_unmask_requests_are_refused(masked_round: Run, name: str, match: str) -> None:
    run = masked_round
    me = run.nodes[0]
    others = run.nodes[1:]
    requests = {
        "missing-sharer": _request(run, run.nodes[:-1], []),
        "stranger": _request(run, run.nodes, [424242]),
        "both": _request(run, run.nodes, [others[0]]),
        "self-dropped": _request(run, others, [me]),
        "too-few": _request(run, run.nodes[: run.t - 1], run.nodes[run.t - 1 :]),
        "repeated": _request(run, [*run.nodes, me], []),
        # An unpacked list, bytes cut short of a whole u64, and no survivors at all.
        "not-packed-list": {"survivors": list(run.nodes), "dropped": pack_ids([])},
        "not-packed-length": {
            "survivors": pack_ids(run.nodes[:-1]),
            "dropped": pack_ids(run.nodes[-1:])[:-1],
        },
        "not-packed-missing": {"dropped": pack_ids([])},
    }
    with pytest.raises(MaskProtocolError, match=match):
        cm.reveal_shares(run.plan, run.states[me], ROUND, requests[name])
    # A refused request reveals nothing and leaves the client able to answer a sound one.
    state, reply = cm.reveal_shares(run.plan, run.states[me], ROUND, _request(run, run.nodes, []))
    assert state.stage == "unmasked" and set(reply["kinds"]) == {cm.KIND_SELF}
    # It reveals its own kept share too: peers are itself and its neighbours.
    assert sorted(unpack_ids(reply["peers"])) == sorted(run.nodes)


def test_stages_out_of_order_or_of_another_round_are_refused() -> None:
    params = resolve_mask_params(4)
    plan = make_plan(params)
    nodes = [11, 22, 33, 44]
    server = MaskRound(params, FED, ROUND)
    states = {}
    for node in nodes:
        states[node], reply = cm.start_round(ROUND, node)
        server.admit_keys(node, reply)
    members = server.members_record()
    me = nodes[0]
    fresh = states[me]
    unmask_all = {"survivors": pack_ids(nodes), "dropped": pack_ids([])}
    with pytest.raises(MaskProtocolError, match="out of order"):
        cm.open_and_mask(plan, fresh, ROUND, {}, SMALL_SLOTS, SMALL_T)
    with pytest.raises(MaskProtocolError, match="out of order"):
        cm.reveal_shares(plan, fresh, ROUND, unmask_all)
    with pytest.raises(MaskProtocolError, match="no masking state"):
        cm.share_secrets(plan, None, ROUND, members)
    with pytest.raises(MaskProtocolError, match="no masking state"):
        cm.share_secrets(plan, fresh, ROUND + 1, members)
    for node in nodes:
        states[node], reply = cm.share_secrets(plan, states[node], ROUND, members)
        server.admit_shares(node, reply)
    server.close_sharing()
    with pytest.raises(MaskProtocolError, match="out of order"):
        cm.share_secrets(plan, states[me], ROUND, members)
    with pytest.raises(MaskProtocolError, match="out of order"):
        cm.reveal_shares(plan, states[me], ROUND, unmask_all)
    with pytest.raises(MaskProtocolError, match="no masking state"):
        cm.open_and_mask(plan, states[me], ROUND - 1, server.train_record(me), 8, SMALL_T)
    masked, _ = cm.open_and_mask(plan, states[me], ROUND, server.train_record(me), 8, SMALL_T)
    with pytest.raises(MaskProtocolError, match="out of order"):
        cm.open_and_mask(plan, masked, ROUND, server.train_record(me), 8, SMALL_T)
    with pytest.raises(MaskProtocolError, match="no masking state"):
        cm.reveal_shares(plan, masked, ROUND + 1, unmask_all)
    with pytest.raises(MaskProtocolError, match="no masking state"):
        cm.reveal_shares(plan, None, ROUND, unmask_all)
    done, _ = cm.reveal_shares(plan, masked, ROUND, unmask_all)
    # A state of an earlier round is no state for the next one.
    with pytest.raises(MaskProtocolError, match="no masking state"):
        cm.reveal_shares(plan, done, ROUND + 1, unmask_all)


def test_a_dropped_client_that_wakes_up_refuses_to_reveal(masked_round: Run) -> None:
    """A late client named dropped reveals nothing, and the server takes no late reveal."""
    run = masked_round
    late = run.nodes[0]
    record = unmask(run, run.nodes[1:])
    with pytest.raises(MaskProtocolError, match="not among the survivors"):
        cm.reveal_shares(run.plan, run.states[late], ROUND, record)
    forged = {"peers": pack_ids(run.nodes), "kinds": [KIND_SELF] * 6, "shares": [b"x"] * 6}
    with pytest.raises(MaskProtocolError, match="not a survivor"):
        run.server.admit_reveal(late, forged)
    # The late client's upload is not in the sum; the offset matches the survivors' masks.
    total = run.server.slot_offset(run.slots, run.modulus)
    for node in run.server.survivors:
        add_mod(total, run.masks[node], run.modulus)
    assert not total.any()


def test_the_masking_state_survives_the_node_context() -> None:
    """Deployment and simulation keep the state as JSON between stages; same masks."""
    run = start(5, slots=SMALL_SLOTS)
    node = run.nodes[0]
    # Redo stage 3 from a JSON round trip of the stage-2 state.
    server = run.server
    shared = replace(run.states[node], stage="shares", sharers=(), held=())
    again = cm.MaskState.from_json(shared.to_json())
    assert again == shared
    _, mask = cm.open_and_mask(
        run.plan, again, ROUND, server.train_record(node), SMALL_SLOTS, SMALL_T
    )
    assert np.array_equal(mask, run.masks[node])
    assert cm.MaskState.from_json(run.states[node].to_json()) == run.states[node]


# ---------------------------------------------------------------------- 4. tampering
def _sealed_pair() -> dict[str, Any]:
    sender_sk, sender_pk = new_key_pair()
    recipient_sk, recipient_pk = new_key_pair()
    other_sk, other_pk = new_key_pair()
    pair, own = split_secret(new_secret(), 2, 3)[:2]
    blob = seal_shares(sender_sk, recipient_pk, FED, ROUND, 5, 9, pair, own)
    return {
        "sender_pk": sender_pk,
        "sender_sk": sender_sk,
        "recipient_sk": recipient_sk,
        "other_sk": other_sk,
        "other_pk": other_pk,
        "shares": (pair, own),
        "blob": blob,
    }


def test_sealed_shares_open_only_unaltered_for_their_recipient_and_round() -> None:
    s = _sealed_pair()
    rsk, spk, blob = s["recipient_sk"], s["sender_pk"], s["blob"]
    assert open_shares(rsk, spk, FED, ROUND, 5, 9, blob) == s["shares"]
    for at in (0, 12, len(blob) // 2, len(blob) - 1):  # nonce, body, tag
        bad = bytearray(blob)
        bad[at] ^= 0x01
        with pytest.raises(MaskProtocolError, match="authentication"):
            open_shares(rsk, spk, FED, ROUND, 5, 9, bytes(bad))
    with pytest.raises(MaskProtocolError):
        open_shares(rsk, spk, FED, ROUND, 5, 9, blob[:-1])
    with pytest.raises(MaskProtocolError, match="malformed"):
        open_shares(rsk, spk, FED, ROUND, 5, 9, blob[:12])
    # Replayed to another recipient (with its own key, or relabelled), round or federation.
    with pytest.raises(MaskProtocolError, match="authentication"):
        open_shares(s["other_sk"], spk, FED, ROUND, 5, 10, blob)
    with pytest.raises(MaskProtocolError, match="authentication"):
        open_shares(rsk, spk, FED, ROUND, 5, 10, blob)
    with pytest.raises(MaskProtocolError, match="authentication"):
        open_shares(rsk, spk, FED, ROUND + 1, 5, 9, blob)
    with pytest.raises(MaskProtocolError, match="authentication"):
        open_shares(rsk, spk, "b" * 32, ROUND, 5, 9, blob)
    # Claimed to come from another sender.
    with pytest.raises(MaskProtocolError, match="authentication"):
        open_shares(rsk, spk, FED, ROUND, 6, 9, blob)
    with pytest.raises(MaskProtocolError, match="authentication"):
        open_shares(rsk, s["other_pk"], FED, ROUND, 5, 9, blob)


@pytest.mark.parametrize("which", ["mask-pks", "share-pks"])
def test_a_member_list_with_other_keys_for_this_client_is_refused(which: str) -> None:
    params = resolve_mask_params(4)
    plan = make_plan(params)
    server = MaskRound(params, FED, ROUND)
    states = {}
    for node in (1, 2, 3, 4):
        states[node], reply = cm.start_round(ROUND, node)
        server.admit_keys(node, reply)
    record = server.members_record()
    swapped = dict(record)
    keys = list(record[which])
    keys[0] = new_key_pair()[1]
    swapped[which] = keys
    with pytest.raises(MaskProtocolError, match="other keys for this client"):
        cm.share_secrets(plan, states[1], ROUND, swapped)
    without = {
        "members": pack_ids(unpack_ids(record["members"])[1:]),
        "mask-pks": record["mask-pks"][1:],
        "share-pks": record["share-pks"][1:],
    }
    with pytest.raises(MaskProtocolError, match="not among the round's members"):
        cm.share_secrets(plan, states[1], ROUND, without)
    misaligned = dict(record, **{which: record[which][1:]})
    with pytest.raises(MaskProtocolError, match="does not match"):
        cm.share_secrets(plan, states[1], ROUND, misaligned)
    unpacked = dict(record, members=unpack_ids(record["members"]))
    with pytest.raises(MaskProtocolError, match="not a packed list of node ids"):
        cm.share_secrets(plan, states[1], ROUND, unpacked)
    cm.share_secrets(plan, states[1], ROUND, record)  # the true list is accepted


@pytest.fixture
def shared_ring() -> tuple[Run, dict[int, dict[str, Any]]]:
    """Eight clients on a ring (k = 4, T = 3) after stage 2; the train records per node."""
    run = start(8, 4, silent=())
    # Rewind stage 3 so that open_and_mask can be called on the stage-2 states.
    for node in run.nodes:
        run.states[node] = replace(run.states[node], stage="shares", sharers=(), held=())
    return run, {n: run.server.train_record(n) for n in run.nodes}


def test_shares_missing_or_from_non_neighbours_are_refused(
    shared_ring: tuple[Run, dict[int, dict[str, Any]]],
) -> None:
    run, records = shared_ring
    me = run.nodes[0]
    state = run.states[me]
    record = records[me]
    stranger = next(x for x in run.nodes if x != me and x not in run.neighbours(me))

    def call(rec: dict[str, Any]) -> None:
        cm.open_and_mask(run.plan, state, ROUND, rec, SMALL_SLOTS, SMALL_T)

    senders = unpack_ids(record["from"])
    missing = dict(record, **{"from": pack_ids(senders[1:]), "sealed": record["sealed"][1:]})
    with pytest.raises(MaskProtocolError, match="shares missing"):
        call(missing)
    extra = dict(
        record,
        **{
            "from": pack_ids([*senders, stranger]),
            "sealed": [*record["sealed"], record["sealed"][0]],
        },
    )
    with pytest.raises(MaskProtocolError, match="shares missing"):
        call(extra)
    instead = dict(record, **{"from": pack_ids([stranger, *senders[1:]])})
    with pytest.raises(MaskProtocolError, match="shares missing"):
        call(instead)
    swapped = dict(record, sealed=[record["sealed"][1], record["sealed"][0], *record["sealed"][2:]])
    with pytest.raises(BadSharesError, match="do not open") as info:
        call(swapped)
    assert info.value.senders == sorted(senders[:2])  # the client names whose shares fail
    # Another client's shares, relayed to this one under their true sender.
    neighbour = senders[0]
    other = next(x for x in run.neighbours(neighbour) if x != me)
    foreign = run.server.sealed[neighbour][other]
    relayed = dict(record, sealed=[foreign, *record["sealed"][1:]])
    with pytest.raises(BadSharesError, match="do not open"):
        call(relayed)
    lacking = dict(record, sharers=pack_ids(x for x in unpack_ids(record["sharers"]) if x != me))
    with pytest.raises(MaskProtocolError, match="lack this client"):
        call(lacking)
    mismatched = dict(record, sealed=record["sealed"][1:])
    with pytest.raises(MaskProtocolError, match="does not match"):
        call(mismatched)
    for field in ("from", "sharers"):
        for bad in (unpack_ids(record[field]), record[field][:-3]):
            with pytest.raises(MaskProtocolError, match="not a packed list of node ids"):
                call(dict(record, **{field: bad}))
    call(record)  # the true record is accepted


def test_server_admits_shares_only_for_exactly_the_neighbours() -> None:
    params = resolve_mask_params(8, 4)
    plan = make_plan(params)
    server = MaskRound(params, FED, ROUND)
    states, replies = {}, {}
    nodes = [100 + i for i in range(8)]
    for node in nodes:
        states[node], reply = cm.start_round(ROUND, node)
        server.admit_keys(node, reply)
    members = server.members_record()
    for node in nodes:
        _, replies[node] = cm.share_secrets(plan, states[node], ROUND, members)
    me = nodes[0]
    good = replies[me]
    to = unpack_ids(good["to"])
    assert sorted(to) == list(server.graph[me])
    stranger = next(x for x in nodes if x != me and x not in server.graph[me])
    bad_replies = [
        dict(good, to=pack_ids(to[1:]), sealed=good["sealed"][1:]),
        dict(good, to=pack_ids([stranger, *to[1:]])),
        dict(good, to=pack_ids([*to, stranger]), sealed=[*good["sealed"], good["sealed"][0]]),
        dict(good, to=pack_ids([to[1], *to[1:]])),
        dict(good, to=pack_ids([me, *to[1:]])),
    ]
    for bad in bad_replies:
        with pytest.raises(MaskProtocolError, match="exactly the node's neighbours"):
            server.admit_shares(me, bad)
    with pytest.raises(MaskProtocolError, match="malformed"):
        server.admit_shares(me, dict(good, sealed=good["sealed"][1:]))
    for not_packed in (to, good["to"][:-1], None):
        with pytest.raises(MaskProtocolError, match="malformed share reply"):
            server.admit_shares(me, dict(good, to=not_packed))
    with pytest.raises(MaskProtocolError, match="malformed sealed share"):
        server.admit_shares(me, dict(good, sealed=[b"", *good["sealed"][1:]]))
    with pytest.raises(MaskProtocolError, match="not a member"):
        server.admit_shares(999, good)
    server.admit_shares(me, good)
    with pytest.raises(MaskProtocolError, match="second share reply"):
        server.admit_shares(me, good)


def test_server_admits_only_sound_reveals(masked_round: Run) -> None:
    run = masked_round
    dropped = run.nodes[-1]
    record = run.server.unmask_record(run.nodes[:-1])
    first, second = run.nodes[0], run.nodes[1]
    _, reply = cm.reveal_shares(run.plan, run.states[first], ROUND, record)
    peers = unpack_ids(reply["peers"])
    at = peers.index(dropped)
    own = peers.index(first)
    assert reply["kinds"][at] == KIND_PAIR and reply["kinds"][own] == KIND_SELF
    survivor = next(i for i, p in enumerate(peers) if p not in (first, dropped))
    for i in (at, survivor, own):  # a self share of the dropped, a pair share of a survivor
        kinds = list(reply["kinds"])
        kinds[i] = KIND_SELF if kinds[i] == KIND_PAIR else KIND_PAIR
        with pytest.raises(MaskProtocolError, match="wrong kind"):
            run.server.admit_reveal(first, dict(reply, kinds=kinds))

    def without(i: int) -> dict[str, Any]:
        return {
            "peers": pack_ids(p for j, p in enumerate(peers) if j != i),
            "kinds": [k for j, k in enumerate(reply["kinds"]) if j != i],
            "shares": [s for j, s in enumerate(reply["shares"]) if j != i],
        }

    # Without its own share, or without a neighbour's, or with a stranger's added.
    for bad in (without(own), without(at), without(survivor)):
        with pytest.raises(MaskProtocolError, match="exactly the node and its neighbours"):
            run.server.admit_reveal(first, bad)
    added = {
        "peers": pack_ids([*peers, 424242]),
        "kinds": [*reply["kinds"], KIND_SELF],
        "shares": [*reply["shares"], reply["shares"][own]],
    }
    with pytest.raises(MaskProtocolError, match="exactly the node and its neighbours"):
        run.server.admit_reveal(first, added)
    with pytest.raises(MaskProtocolError, match="malformed reveal"):
        run.server.admit_reveal(first, dict(reply, shares=reply["shares"][1:]))
    for not_packed in (peers, reply["peers"][:-1], None):
        with pytest.raises(MaskProtocolError, match="malformed reveal"):
            run.server.admit_reveal(first, dict(reply, peers=not_packed))
    assert not run.server.revealed  # nothing of a refused reveal is kept
    run.server.admit_reveal(first, reply)
    with pytest.raises(MaskProtocolError, match="second reveal"):
        run.server.admit_reveal(first, reply)
    with pytest.raises(MaskProtocolError, match="not a survivor"):
        run.server.admit_reveal(dropped, reply)
    _, reply2 = cm.reveal_shares(run.plan, run.states[second], ROUND, record)
    run.server.admit_reveal(second, reply2)


@pytest.mark.parametrize(
    "variant",
    ["short", "not-bytes", "index-of-another", "index-zero", "own-index-of-a-neighbour"],
)
def test_a_malformed_revealed_share_is_excluded_and_the_round_still_unmasks(
    masked_round: Run, variant: str
) -> None:
    """One survivor's bad share is refused at admission, not left to break the rebuild."""
    run = masked_round
    record = run.server.unmask_record(run.nodes)
    replies = {}
    for node in run.nodes:
        run.states[node], replies[node] = cm.reveal_shares(
            run.plan, run.states[node], ROUND, record
        )
    honest, bad, peer = run.nodes[0], run.nodes[1], run.nodes[2]
    bad_peers = unpack_ids(replies[bad]["peers"])
    at = bad_peers.index(bad if variant.startswith("own-") else peer)
    share = replies[bad]["shares"][at]
    other = replies[honest]["shares"][unpack_ids(replies[honest]["peers"]).index(peer)]
    # The revealer kept share k + 1 of its own seed; its lowest neighbour holds share 1.
    assert int.from_bytes(replies[bad]["shares"][bad_peers.index(bad)][:2], "little") == 6
    replies[bad]["shares"][at] = {
        "short": share[:-1],
        "not-bytes": share.hex(),
        "index-of-another": other[:2] + share[2:],  # a repeated Shamir index
        "index-zero": bytes(2) + share[2:],
        "own-index-of-a-neighbour": (1).to_bytes(2, "little") + share[2:],
    }[variant]
    match = "malformed reveal" if variant == "not-bytes" else "malformed or not the one it holds"
    with pytest.raises(MaskProtocolError, match=match):
        run.server.admit_reveal(bad, replies[bad])
    for node in run.nodes:
        if node != bad:
            run.server.admit_reveal(node, replies[node])
    # Five survivors revealed, T = 4: every self-mask seed still has T shares (the bad
    # revealer's own from its five neighbours).
    total = run.server.slot_offset(run.slots, run.modulus)
    for node in run.server.survivors:
        add_mod(total, run.masks[node], run.modulus)
    assert not total.any()


def _flip(share: bytes) -> bytes:
    """The same Shamir index, another value: a share of a different secret."""
    return share[:2] + bytes(b ^ 0xA5 for b in share[2:])


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        (KIND_SELF, "rebuild a wrong self-mask seed"),
        (KIND_PAIR, "rebuild a wrong mask key"),
    ],
)
def test_wrong_shares_abandon_the_round(masked_round: Run, kind: int, match: str) -> None:
    run = masked_round
    record = run.server.unmask_record(run.nodes[:-1])
    for node in run.server.survivors:
        run.states[node], reply = cm.reveal_shares(run.plan, run.states[node], ROUND, record)
        # Every share of this kind altered, so whichever T the server combines are wrong.
        reply["shares"] = [
            _flip(s) if k == kind else s
            for s, k in zip(reply["shares"], reply["kinds"], strict=True)
        ]
        run.server.admit_reveal(node, reply)
    with pytest.raises(MaskRoundAbandoned, match=match):
        run.server.slot_offset(run.slots, run.modulus)


def test_too_few_reveals_abandon_the_round(masked_round: Run) -> None:
    run = masked_round
    record = run.server.unmask_record(run.nodes)
    for node in run.nodes[: run.t - 1]:  # the rest time out
        run.states[node], reply = cm.reveal_shares(run.plan, run.states[node], ROUND, record)
        run.server.admit_reveal(node, reply)
    with pytest.raises(MaskRoundAbandoned, match="needed"):
        run.server.slot_offset(run.slots, run.modulus)


# ---------------------------------------------------------------------- 5. properties
node_ids = st.integers(0, 2**64 - 1)


@settings(max_examples=60, deadline=None)
@given(
    members=st.lists(node_ids, min_size=2, max_size=40, unique=True),
    half=st.integers(1, 12),
    complete=st.booleans(),
    seed=st.binary(min_size=32, max_size=32),
)
def test_neighbour_graph_is_a_regular_symmetric_graph(
    members: list[int], half: int, complete: bool, seed: bytes
) -> None:
    n = len(members)
    k = 2 * half if not complete else max(n - 1, 1) + half  # even ring degree, or >= n - 1
    degree = MaskParams(neighbours=k, threshold=1).degree(n)
    graph = neighbour_graph(members, degree, seed)
    assert set(graph) == set(members)
    for node, peers in graph.items():
        assert len(peers) == len(set(peers)) == min(k, n - 1)
        assert node not in peers
        assert set(peers) <= set(members)
        assert list(peers) == sorted(peers)
        for peer in peers:
            assert node in graph[peer]
    assert neighbour_graph(list(reversed(members)), degree, seed) == graph
    assert neighbours_of(members[0], members, degree, seed) == graph[members[0]]


def test_neighbour_graph_refuses_bad_members() -> None:
    with pytest.raises(ValueError, match="repeat"):
        neighbour_graph([1, 2, 2], 2, bytes(32))
    with pytest.raises(ValueError, match="not a node id"):
        neighbour_graph([1, -2, 3], 2, bytes(32))
    with pytest.raises(ValueError, match="not a member"):
        neighbours_of(4, [1, 2, 3], 2, bytes(32))


def test_mask_parameters() -> None:
    assert default_neighbours(6) == 5  # complete graph for small rounds
    assert default_neighbours(100) == 2 * 10  # 2 * ceil(1.5 * log2(100))
    assert default_threshold(5) == 4 and default_threshold(4) == 3
    assert resolve_mask_params(12, 4) == MaskParams(neighbours=4, threshold=3)
    with pytest.raises(ValueError, match="at least 2 clients"):
        resolve_mask_params(1)
    with pytest.raises(ValueError, match="even"):
        resolve_mask_params(12, 5)
    with pytest.raises(ValueError, match="exceeds"):
        MaskParams(neighbours=4, threshold=5)
    with pytest.raises(ValueError, match="integer >= 1"):
        MaskParams(neighbours=0, threshold=1)


@settings(max_examples=30, deadline=None)
@given(
    secret=st.binary(min_size=16, max_size=16),
    count=st.integers(1, 20),
    data=st.data(),
)
def test_shamir_round_trip_with_any_threshold_subset(secret: bytes, count: int, data: Any) -> None:
    threshold = data.draw(st.integers(1, count))
    shares = split_secret(secret, threshold, count)
    assert len(shares) == count and all(len(s) == 18 for s in shares)
    subset = data.draw(st.permutations(shares)).copy()[: data.draw(st.integers(threshold, count))]
    assert combine_secret(subset, threshold) == secret
    if threshold > 1:
        with pytest.raises(MaskProtocolError, match="needed"):
            combine_secret(subset[: threshold - 1], threshold)
        with pytest.raises(MaskProtocolError, match="repeated"):
            combine_secret([subset[0], *subset[: threshold - 1]], threshold)


# pycryptodome's Shamir.split of bytes(range(16)) with threshold 3, pinned: the batched
# reconstruction must rebuild what pycryptodome's sharing (the clients') produced.
KAT_SHARES = [
    "010077378514fe46258c7f2d945be020f70f",
    "020098563e44308c18f8c78998a51886e42e",
    "0300ef60b953cacf3b73b0ad06f5f4ab1d2e",
    "0400e847b32e6d2a5c5c102e9768165abac9",
    "05009f71343997697fd7670a0938fa7743c9",
]


@pytest.mark.parametrize("picked", [(0, 1, 2), (4, 2, 0), (1, 3, 4), (0, 1, 2, 3, 4)])
def test_shamir_reconstruction_matches_the_known_answer(picked: tuple[int, ...]) -> None:
    shares = [bytes.fromhex(KAT_SHARES[i]) for i in picked]
    assert combine_secret(shares, 3) == bytes(range(16))
    # A wrong value at one index rebuilds another secret (which the protocol then
    # rejects against the owner's commitment or public key).
    assert combine_secret([_flip(shares[0]), *shares[1:]], 3) != bytes(range(16))


def _pycryptodome_combine(shares: list[bytes], threshold: int) -> bytes:
    """The independent reference: pycryptodome's own per-secret reconstruction."""
    points = [(int.from_bytes(s[:2], "little"), s[2:]) for s in shares[:threshold]]
    return bytes(Shamir.combine(points, ssss=False)) if threshold > 1 else points[0][1]


@settings(max_examples=15, deadline=None)
@given(
    count=st.integers(2, 24),
    secrets=st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=12),
    data=st.data(),
)
def test_batched_reconstruction_matches_pycryptodome(
    count: int, secrets: list[bytes], data: Any
) -> None:
    """Many secrets at once, each from its own subset of shares (so mixed index sets)."""
    threshold = data.draw(st.integers(1, count))
    share_sets = []
    for secret in secrets:
        shares = data.draw(st.permutations(split_secret(secret, threshold, count)))
        share_sets.append(shares[: data.draw(st.integers(threshold, count))])
    rebuilt = combine_secrets(share_sets, threshold)
    assert rebuilt == secrets
    for shares, secret in zip(share_sets, secrets, strict=True):
        assert _pycryptodome_combine(shares, threshold) == secret
    event(f"distinct index sets: {len({tuple(sorted(s[:2] for s in ss)) for ss in share_sets})}")


def test_a_bad_set_in_a_batch_is_refused() -> None:
    good = split_secret(bytes(16), 3, 5)
    for bad, match in [
        (good[:2], "needed"),
        ([good[0], good[0], good[1]], "repeated"),
        ([bytes(2) + good[0][2:], *good[1:3]], "invalid share index"),
        ([good[0][:-1], *good[1:3]], "malformed"),
    ]:
        with pytest.raises(MaskProtocolError, match=match):
            combine_secrets([good, bad, good], 3)


@settings(max_examples=6, deadline=None)
@given(
    secret=st.binary(min_size=16, max_size=16),
    guess=st.binary(min_size=16, max_size=16),
    threshold=st.integers(2, 8),
)
def test_fewer_than_t_shares_are_consistent_with_any_secret(
    secret: bytes, guess: bytes, threshold: int
) -> None:
    """T - 1 colluding holders learn nothing: any guess completes their shares consistently.

    For every guessed secret there is a T-th share (found here with galois' own Lagrange
    interpolation, an independent path) that, with the T - 1 real ones, rebuilds the
    guess; so the T - 1 shares alone favour no secret over another.
    """
    count = threshold + 2
    shares = split_secret(secret, threshold, count)
    colluders = shares[: threshold - 1]
    with pytest.raises(MaskProtocolError, match="needed"):
        combine_secret(colluders, threshold)
    field = galois.GF(
        2**128, irreducible_poly="x^128 + x^7 + x^2 + x + 1", primitive_element="x", verify=False
    )
    xs = [0, *(int.from_bytes(s[:2], "little") for s in colluders)]
    ys = [int.from_bytes(guess, "big"), *(int.from_bytes(s[2:], "big") for s in colluders)]
    poly = galois.lagrange_poly(field(xs), field(ys))
    forged = count.to_bytes(2, "little") + int(poly(field(count))).to_bytes(16, "big")
    assert combine_secret([*colluders, forged], threshold) == guess


def test_shamir_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        split_secret(bytes(15), 2, 3)
    with pytest.raises(ValueError, match="threshold"):
        split_secret(bytes(16), 4, 3)
    with pytest.raises(MaskProtocolError, match="malformed"):
        combine_secret([bytes(17)], 1)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32) | st.binary(min_size=16, max_size=16),
    other=st.binary(min_size=32, max_size=32),
    length=st.integers(64, 600),
    modulus=st.integers(2, 2**62 - 1) | st.sampled_from([2, 3, 2**40 + 1, SMALL_T]),
)
def test_mask_vector_is_a_deterministic_prg_below_the_modulus(
    seed: bytes, other: bytes, length: int, modulus: int
) -> None:
    vec = mask_vector(seed, length, modulus)
    assert vec.dtype == np.uint64 and vec.shape == (length,)
    assert int(vec.max()) < modulus
    assert np.array_equal(vec, mask_vector(seed, length, modulus))
    if other[: len(seed)] != seed:
        assert not np.array_equal(vec, mask_vector(other[: len(seed)], length, modulus))


@pytest.mark.parametrize("modulus", [3, 5, 3 * 2**39 + 1])
def test_mask_vector_is_uniform_with_rejection(modulus: int) -> None:
    """A modulus well between two powers of two is where naive reduction is biased."""
    vec = mask_vector(bytes(range(32)), 40000, modulus)
    if modulus < BINS:
        counts = np.bincount(vec.astype(np.int64), minlength=modulus)
        p = chisquare(counts).pvalue
    else:
        p = chi2_uniform_p(vec, modulus)
    assert p > ALPHA
    # ``word mod modulus`` on the same stream would fail the same test.
    keep = (1 << modulus.bit_length()) - 1
    words = np.frombuffer(hashlib.shake_256(b"x").digest(8 * 40000), dtype="<u8") & keep
    biased = (words % np.uint64(modulus)).astype(np.uint64)
    if modulus < BINS:
        assert chisquare(np.bincount(biased.astype(np.int64), minlength=modulus)).pvalue < ALPHA
    else:
        assert chi2_uniform_p(biased, modulus) < ALPHA


def test_mask_vector_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="seed"):
        mask_vector(bytes(20), 4, 7)
    with pytest.raises(ValueError, match="modulus"):
        mask_vector(bytes(16), 4, 1)
    with pytest.raises(ValueError, match="modulus"):
        mask_vector(bytes(16), 4, 2**62)


@settings(max_examples=30, deadline=None)
@given(
    residues=st.lists(st.integers(0, SMALL_T - 1), min_size=1, max_size=20),
    data=st.data(),
)
def test_add_and_sub_mod_are_inverse(residues: list[int], data: Any) -> None:
    other = data.draw(
        st.lists(st.integers(0, SMALL_T - 1), min_size=len(residues), max_size=len(residues))
    )
    acc = np.array(residues, dtype=np.uint64)
    vals = np.array(other, dtype=np.uint64)
    add_mod(acc, vals, SMALL_T)
    assert acc.tolist() == [(a + b) % SMALL_T for a, b in zip(residues, other, strict=True)]
    sub_mod(acc, vals, SMALL_T)
    assert acc.tolist() == residues


# ---------------------------------------------------------------------- 6. agreement
def _digest(vec: SlotVector) -> str:
    return hashlib.sha256(vec.astype("<u8").tobytes()).hexdigest()


# Golden values, computed once from this implementation and pinned: simulation and
# deployment both derive masks through these functions, so any change here would make
# parties of different versions disagree silently.
KAT_MODULUS = 2**43 + 12345  # about half of the 44-bit words are rejected
GOLDEN = {
    "mask32": "191478cd8c1ac5e963fb7692c79f5df14726d05c4debe567e355a76bab090d27",
    "mask16": "cd31697f149368a483eaed66eaf8994c377ebf232656013fcfb1b5a46a19c632",
    "public": "9ef191ec99a972100e1af2240a794fdc229d04e4413e5710addb63e416296071",
    "pair": "ade0dc1169cb0b6602cd46d4648cc989",
    "graph_seed": "3f342cd9d23974dd0bf5daf69dbce14b81a71ea084a6215a5bca2d66e95ca98e",
    "graph": "8a16192c1cb7d92d3d22a10563a3aff330dd37a6a5fe47e751ef7689f801c164",
    "commit": "563e6c7b25cae566a0cfe92fe9462a2553d945db30f42459c78413e6b747a02c",
    "client_mask": "a2166862fd257af3c27ccf274856b6ba104c9a0377eb465cd58df25b3bb0710b",
}


def _kat_values() -> dict[str, str]:
    a, b = bytes(range(16)), bytes(range(16, 32))
    pair = pairwise_seed(mask_key(a), mask_public_key(b), FED, 3, 5, 9)
    graph = neighbour_graph(list(range(1, 13)), 4, graph_seed(FED, 3))
    return {
        "mask32": _digest(mask_vector(bytes(range(32)), 1000, KAT_MODULUS)),
        "mask16": _digest(mask_vector(a, 1000, KAT_MODULUS)),
        "public": mask_public_key(a).hex(),
        "pair": pair.hex(),
        "graph_seed": graph_seed(FED, 3).hex(),
        "graph": hashlib.sha256(repr(sorted(graph.items())).encode()).hexdigest(),
        "commit": self_mask_commitment(a).hex(),
        "client_mask": _digest(client_mask(500, KAT_MODULUS, a, [(1, pair), (-1, bytes(32))])),
    }


def test_mask_derivation_matches_the_known_answers() -> None:
    assert _kat_values() == GOLDEN


def _reference_mask(seed: bytes, length: int, modulus: int) -> list[int]:
    """The PRG as its docstring specifies it, one word at a time (an independent reading).

    AES-CTR from a zero counter block; little-endian 64-bit words cut to the modulus'
    bit length; the first ``length`` words in place, each rejected one replaced, in
    order, by the next accepted words of the stream after them.
    """
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    keep = (1 << modulus.bit_length()) - 1

    def word() -> int:
        return int.from_bytes(stream.update(bytes(8)), "little") & keep

    out = [word() for _ in range(length)]
    for i, value in enumerate(out):
        while value >= modulus:
            value = word()
        out[i] = value
    return out


@pytest.mark.parametrize(
    ("seed", "length", "modulus"),
    [
        (bytes(range(32)), 1000, KAT_MODULUS),
        (bytes(range(16)), 777, 3),
        (bytes(range(1, 33)), 300, 2**61 + 1),
        (bytes(32), 500, 2**44 - 1),
    ],
)
@pytest.mark.parametrize("chunk", [1, 7, 64, CHUNK_WORDS])
def test_mask_vector_matches_a_word_by_word_reference(
    seed: bytes, length: int, modulus: int, chunk: int
) -> None:
    """Whatever the chunk the keystream is expanded in, the same vector."""
    expected = _reference_mask(seed, length, modulus)
    assert mask_vector(seed, length, modulus, chunk=chunk).tolist() == expected


@pytest.mark.parametrize("chunk", [1, 13, CHUNK_WORDS])
@pytest.mark.parametrize("modulus", [KAT_MODULUS, SMALL_T, 3])
def test_mask_sum_adds_and_subtracts_whole_mask_vectors(chunk: int, modulus: int) -> None:
    """Expanding chunk by chunk into the sums is the sum of the separate vectors."""
    length = 300
    terms = [(1, bytes(range(16))), (-1, bytes(32)), (1, bytes(range(1, 33))), (-1, bytes(16))]
    expected = np.zeros(length, dtype=np.uint64)
    for sign, seed in terms:
        (add_mod if sign > 0 else sub_mod)(expected, mask_vector(seed, length, modulus), modulus)
    total = MaskSum(length, modulus, chunk=chunk)
    for sign, seed in terms:
        total.add(sign, seed)
    assert np.array_equal(total.value(), expected)


@pytest.mark.parametrize("chunk", [1, 13, CHUNK_WORDS])
@pytest.mark.parametrize("modulus", [KAT_MODULUS, SMALL_T, 3])
def test_the_compiled_pass_gives_the_numpy_sum(chunk: int, modulus: int) -> None:
    """The fused pass, rejected words (about half at KAT_MODULUS and at 3) included."""
    length = 300
    terms = [(1, bytes(range(16))), (-1, bytes(32)), (1, bytes(range(1, 33))), (-1, bytes(16))]
    plain, fused = (
        MaskSum(length, modulus, chunk=chunk),
        MaskSum(length, modulus, chunk=chunk, fused=True),
    )
    for sign, seed in terms:
        plain.add(sign, seed)
        fused.add(sign, seed)
    assert np.array_equal(fused.value(), plain.value())


@settings(max_examples=25, deadline=None)
@given(
    signs=st.lists(st.sampled_from([1, -1]), min_size=1, max_size=9),
    length=st.integers(1, 700),
    modulus=st.sampled_from([2, 3, 1000003, KAT_MODULUS, SMALL_T, 2**62 - 57]),
    workers=st.integers(1, 5),
    fused=st.booleans(),
)
def test_threads_and_the_compiled_pass_change_no_bit_of_a_sum(
    signs: list[int], length: int, modulus: int, workers: int, fused: bool
) -> None:
    """Any split of the terms among threads, either pass: the sum of the separate vectors."""
    terms = [(sign, bytes([i]) * (16 if i % 2 else 32)) for i, sign in enumerate(signs)]
    expected = np.zeros(length, dtype=np.uint64)
    for sign, seed in terms:
        (add_mod if sign > 0 else sub_mod)(expected, mask_vector(seed, length, modulus), modulus)
    got = signed_mask_sum(terms, length, modulus, workers=workers, fused=fused)
    assert np.array_equal(got, expected)


def test_signed_mask_sum_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="workers"):
        signed_mask_sum([(1, bytes(16))], 4, SMALL_T, workers=0)
    with pytest.raises(ValueError, match="seed"):
        signed_mask_sum([(1, bytes(16)), (1, bytes(15))], 4, SMALL_T, workers=2)
    with pytest.raises(ValueError, match="modulus"):
        signed_mask_sum([(1, bytes(16))], 4, 2**62, fused=True)


@settings(max_examples=20, deadline=None)
@given(
    a=st.binary(min_size=16, max_size=16),
    b=st.binary(min_size=16, max_size=16),
    ids=st.lists(node_ids, min_size=2, max_size=2, unique=True),
    server_round=st.integers(1, 10**6),
)
def test_both_ends_of_a_pair_derive_the_same_seed(
    a: bytes, b: bytes, ids: list[int], server_round: int
) -> None:
    i, j = ids
    at_i = pairwise_seed(mask_key(a), mask_public_key(b), FED, server_round, i, j)
    at_j = pairwise_seed(mask_key(b), mask_public_key(a), FED, server_round, j, i)
    assert at_i == at_j and len(at_i) == 16
    assert pair_sign(i, j) == -pair_sign(j, i) and pair_sign(i, j) in (1, -1)
    # Pair masks cancel: i adds sign * PRG(s), j adds the opposite.
    [(si, seed_i)] = pair_seeds_of(i, a, [(j, mask_public_key(b))], FED, server_round)
    [(sj, seed_j)] = pair_seeds_of(j, b, [(i, mask_public_key(a))], FED, server_round)
    assert seed_i == seed_j == at_i and si == -sj
    zero = bytes(16)
    total = client_mask(32, SMALL_T, zero, [(si, seed_i)])
    add_mod(total, client_mask(32, SMALL_T, zero, [(sj, seed_j)]), SMALL_T)
    sub_mod(total, mask_vector(zero, 32, SMALL_T), SMALL_T)
    sub_mod(total, mask_vector(zero, 32, SMALL_T), SMALL_T)
    assert not total.any()
    # Bound to the round and the federation.
    assert pairwise_seed(mask_key(a), mask_public_key(b), FED, server_round + 1, i, j) != at_i
    assert pairwise_seed(mask_key(a), mask_public_key(b), "b" * 32, server_round, i, j) != at_i


def test_mask_key_is_a_function_of_the_secret() -> None:
    a = bytes(range(16))
    key = load_private_key(mask_key(a).private_bytes_raw())
    assert key.public_key().public_bytes_raw() == mask_public_key(a)
    assert mask_public_key(bytes(16)) != mask_public_key(a)
    with pytest.raises(ValueError, match="16 bytes"):
        mask_key(bytes(32))


def test_errors_are_sepals_errors() -> None:
    assert issubclass(MaskRoundAbandoned, MaskProtocolError)
    assert issubclass(MaskProtocolError, SepalsError)
