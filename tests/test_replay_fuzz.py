"""Property-based fuzzing of BFV train replies: no changed or replayed ciphertext gets in.

Every case is a round on a server that accepted some uploads before (the *old* ones).
Honest clients send fresh uploads; the others send an old upload, or one sent earlier in
the same round, changed in one of many ways: re-compressed, padded, cut, a header, a
metadata or an envelope byte set, a c0 coefficient or a seed byte changed, c1 written out,
ciphertexts spliced, swapped or repeated, or random bytes. The properties: nothing
escapes ``aggregate_train``; every such reply, and a fresh upload sent a second time, is
excluded with a printable reason; every fresh upload is accepted; and the aggregate
decrypts to exactly the sum of the fresh uploads. Over the whole run at least 1,000
replies are malformed.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from replay_util import (
    HEADER,
    PREFIX,
    chunks_of,
    compressed,
    edited,
    padded,
    unseeded,
    with_chunks,
)

from sepals.common.bfv import BfvCodec
from sepals.common.config import EncryptionConfig
from sepals.common.federation import FederationConfig
from sepals.common.protocol import KEY_CLIENT, KEY_METRICS, KEY_UPDATE
from sepals.common.records import KEY_PAYLOAD, payload_array, read_global_record
from sepals.server.serverapp.strategy import EncryptedFedAvg, ReplayKeys

pytestmark = pytest.mark.usefixtures("run_identity")

CFG = EncryptionConfig()
LENGTH = CFG.values_per_ciphertext + 100  # two ciphertexts
FED = FederationConfig(rounds=2, min_train_clients=1)
OLD, FRESH = 5, 8
EXAMPLES = 110
MIN_MALFORMED = 1000
MUTATIONS = [
    "recompress",
    "pad",
    "cut",
    "header byte",
    "metadata byte",
    "seed record byte",
    "envelope byte",
    "c0 word",
    "seed byte",
    "unseeded",
    "splice",
    "swap",
    "repeat ciphertext",
    "random bytes",
    "as is",
]


@pytest.fixture(scope="module")
def pool(bfv_keys: tuple[bytes, bytes]) -> dict[str, Any]:
    secret, public = bfv_keys
    client, server = BfvCodec.for_client(secret, CFG), BfvCodec.for_server(public, CFG)
    rng = np.random.default_rng(21)
    old = [client.encode(rng.uniform(-1, 1, LENGTH)) for _ in range(OLD)]
    fresh = [client.encode(rng.uniform(-1, 1, LENGTH)) for _ in range(FRESH)]
    keys = ReplayKeys(k for p in old for k in server.validate_upload(p, LENGTH).replay_keys)
    return {
        "client": client,
        "server": server,
        "old": old,
        "fresh": fresh,
        "decoded": [client.decode(p) for p in fresh],
        "keys": keys,
    }


def _reply(node: int, payload: bytes) -> Message:
    orig = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            KEY_UPDATE: ArrayRecord({KEY_PAYLOAD: payload_array(payload)}),
            KEY_METRICS: MetricRecord({"num-examples": 10}),
            KEY_CLIENT: ConfigRecord({"client-id": f"n{node}"}),
        }
    )
    return Message(content, reply_to=orig)


def _set(chunk: bytes, offset: int, value: int) -> bytes:
    return edited(chunk, offset, bytes([value]))


def mutate_chunk(kind: str, chunk: bytes, server: BfvCodec, data: Any) -> bytes:
    """One ciphertext changed as ``kind`` says, details drawn from ``data``."""
    size = server._layout.size
    if kind == "recompress":
        mode = data.draw(st.sampled_from(["zlib", "zstd", "none"]), label="mode")
        level = data.draw(st.integers(1, 19 if mode == "zstd" else 9), label="level")
        trailing = data.draw(st.binary(max_size=8), label="trailing")
        return compressed(chunk, mode, level, trailing)  # "none" without: the same bytes
    if kind == "pad":
        extra = data.draw(st.binary(min_size=1, max_size=16), label="extra")
        return padded(chunk, extra, declared=data.draw(st.booleans(), label="declared"))
    if kind == "cut":
        return chunk[: data.draw(st.integers(0, size - 1), label="cut")]
    if kind in FIXED_BYTES:
        lo, hi = FIXED_BYTES[kind](size)
        at = data.draw(st.integers(lo, hi - 1), label="offset")
        return _set(chunk, at, data.draw(st.integers(0, 255), label="value"))
    if kind == "c0 word":
        word = data.draw(st.integers(0, CFG.poly_modulus_degree - 1), label="word")
        value = data.draw(st.integers(0, 2**64 - 1) | st.integers(0, 2**40), label="value")
        return edited(chunk, PREFIX + 8 * word, struct.pack("<Q", value))
    if kind == "seed byte":
        at = size - 64 + data.draw(st.integers(0, 63), label="byte")
        return _set(chunk, at, chunk[at] ^ data.draw(st.integers(1, 255), label="xor"))
    if kind == "unseeded":
        return unseeded(server, chunk, uncompressed=data.draw(st.booleans(), label="raw"))
    return chunk  # "as is"


# (lo, hi) of the fixed bytes of a canonical ciphertext of ``size`` bytes, by region.
FIXED_BYTES = {
    "header byte": lambda size: (0, HEADER),
    "metadata byte": lambda size: (HEADER, PREFIX),
    "seed record byte": lambda size: (size - 81, size - 64),
}


def mutate(kind: str, payload: bytes, other: bytes, server: BfvCodec, data: Any) -> bytes:
    """``payload`` changed as ``kind`` says: every ciphertext of it, or its envelope."""
    chunks = chunks_of(payload)
    if kind == "envelope byte":
        at = data.draw(st.integers(0, 33 + 4 * len(chunks) - 1), label="offset")
        return _set(payload, at, data.draw(st.integers(0, 255), label="value"))
    if kind == "splice":
        return with_chunks(payload, [chunks[0], chunks_of(other)[1]])
    if kind == "swap":
        return with_chunks(payload, chunks[::-1])
    if kind == "repeat ciphertext":
        return with_chunks(payload, [chunks[0], chunks[0]])
    if kind == "random bytes":
        return data.draw(st.binary(max_size=200), label="random")
    # No ciphertext left as it was, so none can give the replay away by itself.
    return with_chunks(payload, [mutate_chunk(kind, c, server, data) for c in chunks])


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_fuzzed_bfv_replies_never_get_a_changed_or_replayed_ciphertext_in(pool):
    client, server = pool["client"], pool["server"]
    tally = {"malformed": 0, "fresh": 0}

    @FUZZ
    @given(
        plan=st.lists(
            st.tuples(st.sampled_from(["fresh"] * 8 + MUTATIONS * 2), st.integers(0, 99)),
            min_size=8,
            max_size=14,
        ),
        data=st.data(),
    )
    def run(plan: list[tuple[str, int]], data: Any) -> None:
        strategy = EncryptedFedAvg(server, LENGTH, FED)
        strategy.remember_replay_keys(pool["keys"])
        replies, sent, fresh_sent, accepted = [], [], set(), []
        for node, (kind, arg) in enumerate(plan, start=1):
            if kind == "fresh":
                i = arg % FRESH
                payload = pool["fresh"][i]
                if i in fresh_sent:
                    tally["malformed"] += 1  # a replay of this round's upload
                else:
                    fresh_sent.add(i)
                    accepted.append((node, i))
                    sent.append(payload)
            else:
                known = pool["old"] + sent  # every upload the server has accepted
                source = known[arg % len(known)]
                other = known[(arg + 1) % len(known)]
                payload = mutate(kind, source, other, server, data)
                tally["malformed"] += 1
            replies.append(_reply(node, payload))
        arrays, metrics = strategy.aggregate_train(1, replies)
        record = strategy.current_round
        assert [c.node_id for c in record.clients] == [node for node, _ in accepted]
        assert metrics["excluded"] == len(replies) - len(accepted)
        for _, reason in record.excluded:
            assert isinstance(reason, str) and reason.isprintable() and 0 < len(reason) <= 200
        tally["fresh"] += len(accepted)
        if not accepted:
            assert arrays is None
            return
        total = read_global_record(arrays)[0]
        expected = sum(pool["decoded"][i] for _, i in accepted)
        np.testing.assert_allclose(client.decode(total), expected, rtol=0, atol=1e-9)

    run()
    assert tally["malformed"] >= MIN_MALFORMED, tally
    assert tally["fresh"] >= EXAMPLES  # honest uploads kept being accepted
