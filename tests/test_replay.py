"""One encoding per ciphertext: a client cannot get a ciphertext accepted twice.

The attacker is a registered client that re-sends a ciphertext accepted before (its own
previous upload, masked or not), re-encoded in every way SEAL also loads (another
compression, trailing bytes, reserved header bytes set, c1 written out in full) or with one
half edited (c0 moved, which needs no key and shifts the plaintext; another seed). It tries
in the same round, in a later round and after the server restarts from its checkpoint.
Every try is refused with a reason, and honest fresh uploads are still accepted and summed
exactly.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import zstandard
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from replay_util import chunks_of, variants, with_chunks

from sepals.common.bfv import BfvCodec
from sepals.common.ckks import CkksCodec
from sepals.common.codec import PLAIN_FINGERPRINT, PlainCodec, pack_payload, unpack_payload
from sepals.common.config import EncryptionConfig
from sepals.common.errors import MalformedPayloadError
from sepals.common.federation import FederationConfig
from sepals.common.protocol import KEY_CLIENT, KEY_METRICS, KEY_UPDATE
from sepals.common.records import KEY_PAYLOAD, payload_array, read_global_record
from sepals.common.seal_canon import SEAL_HEADER, SeededLayout
from sepals.server.serverapp.state import StateDir
from sepals.server.serverapp.strategy import EncryptedFedAvg

pytestmark = pytest.mark.usefixtures("run_identity")

CFG = EncryptionConfig()
# Two ciphertexts per upload, so that ciphertexts can be spliced between uploads.
LENGTH = CFG.values_per_ciphertext + 100
FED = FederationConfig(rounds=3, min_train_clients=1)
# What SEAL itself does with each variant (the lenient path that reads sums): the
# attacks are real only because SEAL loads them.
SEAL_REFUSES = {"trailing bytes, declared", "trailing bytes, undeclared", "another SEAL version"}
REASONS = {
    "zstd (as SEAL saves it)": "is compressed (zstd)",
    "zstd level 1": "is compressed (zstd)",
    "zstd level 19": "is compressed (zstd)",
    "zstd, trailing bytes": "is compressed (zstd)",
    "zlib": "is compressed (zlib)",
    "zlib, trailing bytes": "is compressed (zlib)",
    "trailing bytes, declared": "has exactly 65730",
    "trailing bytes, undeclared": "declares 65730 bytes, holds 65738",
    "reserved header bytes": "reserved bytes",
    "reserved bytes of c0's header": "coefficient array header differs",
    "reserved bytes of the seed's header": "seed record header differs",
    "another SEAL version": "names SEAL version 4.0",
    "PRNG type shake256": "PRNG type differs",
    "unseeded, uncompressed": "has exactly 65730",
    "unseeded, as SEAL saves it": "is compressed (zstd)",
    "byte for byte": "duplicate ciphertext",
    "c0 moved by one": "duplicate ciphertext",
    "seed changed": "duplicate ciphertext",
}


@pytest.fixture(scope="module")
def codecs(bfv_keys: tuple[bytes, bytes]) -> tuple[BfvCodec, BfvCodec]:
    secret, public = bfv_keys
    return BfvCodec.for_client(secret, CFG), BfvCodec.for_server(public, CFG)


def _reply(node: int, payload: bytes, name: str | None = None) -> Message:
    orig = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            KEY_UPDATE: ArrayRecord({KEY_PAYLOAD: payload_array(payload)}),
            KEY_METRICS: MetricRecord({"num-examples": 10}),
            KEY_CLIENT: ConfigRecord({"client-id": name or f"c{node}"}),
        }
    )
    return Message(content, reply_to=orig)


# ------------------------------------------------------------------ the codec alone
def test_the_client_sends_the_one_encoding_and_the_server_keys_each_half(codecs):
    client, server = codecs
    payload = client.encode(np.ones(LENGTH))
    layout = server._layout
    for chunk in chunks_of(payload):
        *_, compr, reserved, size = SEAL_HEADER.unpack_from(chunk)
        assert (compr, reserved, size, len(chunk)) == (0, 0, layout.size, layout.size)
        c0, seed = layout.parse(0, chunk)
        assert len(c0) == 8 * CFG.poly_modulus_degree and len(seed) == 64
    checked = server.validate_upload(payload, LENGTH)
    assert len(checked.loaded) == 2 and len(set(checked.replay_keys)) == 4
    # From whatever compression SEAL used, the client re-emits the same bytes.
    chunk = chunks_of(payload)[0]
    for mode in ("zstd", "zlib"):
        blob = variants(server, chunk)[mode if mode == "zlib" else "zstd level 19"]
        assert layout.from_seal(blob) == chunk
    with pytest.raises(MalformedPayloadError, match="unexpected layout"):
        layout.from_seal(variants(server, chunk)["unseeded, as SEAL saves it"])
    with pytest.raises(MalformedPayloadError, match="unexpected layout"):
        layout.from_seal(b"\x00" * 8)
    with pytest.raises(ValueError, match="parms id"):
        SeededLayout((1, 2), 8192, 1, (4, 3))


@pytest.mark.parametrize("name", sorted(REASONS))
def test_every_encoding_but_the_canonical_one_is_refused(codecs, name):
    client, server = codecs
    payload = client.encode(np.ones(LENGTH))
    first, second = chunks_of(payload)
    forged = with_chunks(payload, [variants(server, first)[name], second])
    if name in SEAL_REFUSES:
        with pytest.raises(MalformedPayloadError):
            server.validate(forged, LENGTH)
    else:
        assert len(server.validate(forged, LENGTH)) == 2  # SEAL loads it
    if REASONS[name] == "duplicate ciphertext":
        # canonical: keyed like the original by the half it kept
        original = set(server.validate_upload(payload, LENGTH).replay_keys)
        assert original & set(server.validate_upload(forged, LENGTH).replay_keys)
        return
    with pytest.raises(MalformedPayloadError, match=re.escape(REASONS[name])):
        server.validate_upload(forged, LENGTH)


def test_an_upload_that_holds_one_ciphertext_twice_is_refused(codecs):
    client, server = codecs
    payload = client.encode(np.ones(LENGTH))
    first, _ = chunks_of(payload)
    with pytest.raises(MalformedPayloadError, match="same ciphertext twice"):
        server.validate_upload(with_chunks(payload, [first, first]), LENGTH)


def test_plain_values_are_keyed_with_signed_zeros_read_as_zero():
    codec = PlainCodec()
    values = np.array([0.0, 1.5, -2.0], "<f4")
    negative = values.copy()
    negative[0] = -0.0
    a, b = (pack_payload(1, PLAIN_FINGERPRINT, 3, [v.tobytes()]) for v in (values, negative))
    assert a != b
    assert codec.validate_upload(a, 3).replay_keys == codec.validate_upload(b, 3).replay_keys
    with pytest.raises(MalformedPayloadError, match="one chunk of 12 bytes"):
        codec.validate_upload(pack_payload(1, PLAIN_FINGERPRINT, 3, [values.tobytes() + b"x"]))


def test_ckks_accepts_only_tenseals_own_encoding(ckks_keys):
    secret, public = ckks_keys
    config = EncryptionConfig(scheme="ckks")
    client, server = CkksCodec.for_client(secret, config), CkksCodec.for_server(public, config)
    payload = client.encode(np.ones(10))
    checked = server.validate_upload(payload, 10)
    assert len(checked.replay_keys) == 1
    (chunk,) = chunks_of(payload)
    # A protobuf field TenSEAL does not know: TenSEAL loads it, then writes it without.
    extra = with_chunks(payload, [chunk + b"\x78\x01"])
    assert len(server.validate(extra, 10)) == 1
    with pytest.raises(MalformedPayloadError, match="not in TenSEAL's own encoding"):
        server.validate_upload(extra, 10)


# ------------------------------------------------------------------ the server
def _masked_pair(client: BfvCodec, seed: int) -> tuple[list[bytes], np.ndarray]:
    """Two uploads whose masks cancel in their sum, and that sum's decoded values."""
    t = client.plain_modulus
    slots = client.slot_count(LENGTH)
    mask = np.random.default_rng(seed).integers(0, t, slots, dtype=np.uint64)
    other = (np.uint64(t) - mask) % np.uint64(t)
    vectors = [np.random.default_rng(seed + i).uniform(-1, 1, LENGTH) for i in (1, 2)]
    payloads = [
        client.encode_update(v, np.random.default_rng(seed), slot_mask=m)[0]
        for v, m in zip(vectors, (mask, other), strict=True)
    ]
    plain = [client.encode(v, np.random.default_rng(seed)) for v in vectors]
    return payloads, sum(client.decode(p) for p in plain)


def _attempts(server: BfvCodec, old: bytes, fresh: bytes) -> dict[str, bytes]:
    """Every way of sending ``old`` again, and uploads spliced from ``old`` and ``fresh``.

    A variant changes both ciphertexts: neither gives the replay away by itself.
    """
    first, second = chunks_of(old)
    both = variants(server, first), variants(server, second)
    out = {name: with_chunks(old, [ct, both[1][name]]) for name, ct in both[0].items()}
    out["old first ciphertext, fresh second"] = with_chunks(old, [first, chunks_of(fresh)[1]])
    out["ciphertexts swapped"] = with_chunks(old, [second, first])
    return out


def _refused_all(strategy: EncryptedFedAvg, server_round: int, attempts, honest) -> None:
    replies = [_reply(100 + i, p, f"x{i}") for i, p in enumerate(attempts.values())]
    arrays, metrics = strategy.aggregate_train(server_round, [*honest, *replies])
    record = strategy.current_round
    assert metrics["accepted"] == len(honest)
    assert [c.node_id for c in record.clients] == [1, 2]
    reasons = dict(record.excluded)
    assert sorted(reasons) == [100 + i for i in range(len(attempts))]
    for i, name in enumerate(attempts):
        reason = reasons[100 + i]
        assert reason.isprintable() and len(reason) <= 200
        expected = REASONS.get(name.removesuffix(" (round 2)"), "duplicate ciphertext")
        assert expected in reason, (name, reason)
    return arrays


def test_replays_in_every_encoding_are_refused_in_the_round_later_and_after_a_restart(
    codecs, tmp_path
):
    client, server = codecs
    strategy = EncryptedFedAvg(server, LENGTH, FED)
    (p1, p2), expected = _masked_pair(client, 1)
    # Round 1: another client re-sends node 1's masked upload in every way.
    attempts = _attempts(server, p1, client.encode(np.ones(LENGTH)))
    arrays = _refused_all(strategy, 1, attempts, [_reply(1, p1), _reply(2, p2)])
    total, _ = read_global_record(arrays)
    np.testing.assert_allclose(client.decode(total), expected, atol=1e-9)
    # Round 2: node 1 re-sends its round-1 upload beside fresh ones.
    (f1, f2), expected = _masked_pair(client, 2)
    arrays = _refused_all(strategy, 2, _attempts(server, p1, f1), [_reply(1, f1), _reply(2, f2)])
    np.testing.assert_allclose(client.decode(read_global_record(arrays)[0]), expected, atol=1e-9)
    # After a restart from the checkpoint, uploads of both rounds are still refused.
    state = StateDir(tmp_path)
    state.save_checkpoint(strategy, 2)
    resumed = EncryptedFedAvg(server, LENGTH, FED, round_offset=2)
    state.load_checkpoint(server, LENGTH).restore(resumed)
    (g1, g2), expected = _masked_pair(client, 3)
    attempts = {
        **_attempts(server, p2, g1),
        **{f"{k} (round 2)": v for k, v in _attempts(server, f2, g2).items()},
    }
    arrays = _refused_all(resumed, 1, attempts, [_reply(1, g1), _reply(2, g2)])
    np.testing.assert_allclose(client.decode(read_global_record(arrays)[0]), expected, atol=1e-9)


def test_a_legacy_zstd_upload_names_its_compression(codecs):
    """What a client of an older sepals sends is refused with a reason that says why."""
    client, server = codecs
    payload = client.encode(np.ones(10))
    (chunk,) = unpack_payload(payload)[1]
    body = zstandard.ZstdCompressor().compress(chunk[SEAL_HEADER.size :])
    magic, hsize, major, minor, _, reserved, _ = SEAL_HEADER.unpack_from(chunk)
    old = SEAL_HEADER.pack(magic, hsize, major, minor, 2, reserved, 16 + len(body)) + body
    strategy = EncryptedFedAvg(server, 10, FED)
    strategy.aggregate_train(1, [_reply(1, with_chunks(payload, [old]))])
    [(node, reason)] = strategy.current_round.excluded
    assert node == 1 and "is compressed (zstd)" in reason and "uncompressed seeded" in reason
