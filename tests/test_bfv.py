"""The compact BFV codec: exactness, tolerance, overflow by construction, adversarial input."""

from __future__ import annotations

import math
import struct

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from sepals.common.bfv import BfvCodec
from sepals.common.codec import PlainCodec, pack_payload, unpack_payload
from sepals.common.config import (
    BFV_NOISE_PER_SUMMAND,
    BFV_RINGS,
    MAX_COEFF_MODULUS_BITS,
    EncryptionConfig,
    bfv_ciphertexts,
    bfv_ring_for,
)
from sepals.common.errors import (
    ForeignKeyError,
    MalformedPayloadError,
    MissingSecretKeyError,
    NonFiniteUpdateError,
    SecretKeyExposureError,
)
from sepals.common.scheme import (
    context_fingerprint,
    generate_secret_context,
    make_client_codec,
    make_server_codec,
)
from sepals.common.seal_bundle import key_parameters, public_bfv_bundle, unpack_bundle

CFG = EncryptionConfig()
PER_CT = CFG.values_per_ciphertext


@pytest.fixture(scope="module")
def codecs(bfv_keys):
    secret, public = bfv_keys
    return BfvCodec.for_client(secret, CFG), BfvCodec.for_server(public, CFG)


def test_default_is_the_bfv_codec(bfv_keys):
    secret, public = bfv_keys
    assert EncryptionConfig().scheme == "bfv"
    assert isinstance(make_client_codec(CFG, secret), BfvCodec)
    assert isinstance(make_server_codec(CFG, public), BfvCodec)


@pytest.mark.parametrize("length", [1, PER_CT - 1, PER_CT, PER_CT + 1, 3 * PER_CT + 17])
def test_sum_of_quantized_updates_is_exact(codecs, length):
    client, server = codecs
    rng = np.random.default_rng(length)
    updates = [rng.uniform(-CFG.update_bound, CFG.update_bound, length) for _ in range(5)]
    payloads, ints = [], []
    for i, x in enumerate(updates):
        payloads.append(client.encode(x, np.random.default_rng(i)))
        ints.append(client.quantize(x, np.random.default_rng(i))[0])
    total = server.aggregate(payloads, expected_length=length)
    assert client.integer_sum(total).tolist() == np.sum(ints, axis=0).tolist()
    # so the decoded sum is off only by the clients' own rounding: < one step each
    decoded = client.decode(total)
    assert decoded.shape == (length,)
    assert np.max(np.abs(decoded - np.sum(updates, axis=0))) < len(updates) * CFG.quant_step


def test_fedavg_tolerance_after_division(codecs):
    """Sum of a_i * w_i over the weight total: error <= sum(step) / sum(a_i).

    ``a_i = n_i / cap`` (at most 1), as clients weight their changes.
    """
    client, server = codecs
    rng = np.random.default_rng(7)
    weights = rng.integers(50, 500, size=6).astype(float) / 500
    models = [rng.normal(0, 1.0, size=2000) for _ in weights]
    payloads, errors = [], []
    for a, w in zip(weights, models, strict=True):
        payload, err = client.encode_update(a * w)
        payloads.append(payload)
        errors.append(err)
    got = client.decode(server.aggregate(payloads, 2000)) / weights.sum()
    expected = np.sum([a * w for a, w in zip(weights, models, strict=True)], axis=0) / weights.sum()
    bound = sum(errors) / weights.sum()
    assert all(0 < e < CFG.quant_step for e in errors)
    assert np.max(np.abs(got - expected)) <= bound
    assert bound < 1e-2  # the bound is tight enough to matter: weights are O(1)


def test_stochastic_rounding_is_unbiased_and_seeded(codecs):
    client, _ = codecs
    x = np.full(200_000, 0.3 * CFG.quant_step)
    q, err = client.quantize(x, np.random.default_rng(1))
    assert set(np.unique(q).tolist()) == {0, 1}
    assert q.mean() == pytest.approx(0.3, abs=0.005)
    assert err == pytest.approx(0.7 * CFG.quant_step)
    again, _ = client.quantize(x, np.random.default_rng(1))
    assert np.array_equal(q, again)


def test_worst_case_sum_of_max_clients_does_not_overflow(codecs):
    """max_clients updates at +-update_bound: exact sum, and noise budget left."""
    client, server = codecs
    x = np.array([CFG.update_bound, -CFG.update_bound] * 10)
    q, _ = client.quantize(x, np.random.default_rng(0))
    assert np.max(np.abs(q)) <= CFG.max_quantized
    loaded = server.validate(client.encode(x, np.random.default_rng(0)), x.size)
    total = server.aggregate_loaded([loaded] * CFG.max_clients, x.size)
    assert client.integer_sum(total).tolist() == (q * CFG.max_clients).tolist()
    assert CFG.max_clients * CFG.max_quantized <= CFG.field_capacity
    assert client.noise_budget_bits(total) > 0
    with pytest.raises(ValueError, match="max_clients"):
        server.aggregate_loaded([loaded] * (CFG.max_clients + 1), x.size)


def test_update_bound_is_enforced(codecs):
    client, _ = codecs
    client.encode(np.array([CFG.update_bound]))
    with pytest.raises(ValueError, match="update_bound"):
        client.encode(np.array([CFG.update_bound * 1.001]))
    with pytest.raises(NonFiniteUpdateError):
        client.encode(np.array([0.0, np.nan]))


def test_server_refuses_secret_bundle_and_cannot_decrypt(bfv_keys, codecs):
    secret, public = bfv_keys
    client, server = codecs
    with pytest.raises(SecretKeyExposureError):
        BfvCodec.for_server(secret, CFG)
    with pytest.raises(MissingSecretKeyError):
        BfvCodec.for_client(public, CFG)
    payload = client.encode(np.arange(10.0))
    assert not server.can_decrypt and client.can_decrypt
    with pytest.raises(MissingSecretKeyError):
        server.decode(payload)
    with pytest.raises(MissingSecretKeyError):
        server.encode(np.arange(10.0))
    assert public_bfv_bundle(secret) == public
    assert unpack_bundle(public)[2] is None  # the server's bundle holds no secret key
    assert context_fingerprint(secret) == context_fingerprint(public) == server.fingerprint


def test_foreign_key_and_wrong_codec_rejected(codecs):
    client, server = codecs
    foreign = BfvCodec.for_client(generate_secret_context(CFG), CFG)
    with pytest.raises(ForeignKeyError, match="made under key"):
        server.validate(foreign.encode(np.ones(100)), 100)
    with pytest.raises(MalformedPayloadError, match="codec id"):
        server.validate(PlainCodec().encode(np.ones(100)), 100)
    with pytest.raises(MalformedPayloadError, match="99 values, expected 100"):
        server.validate(client.encode(np.ones(99)), 100)


def test_truncated_payloads_rejected(codecs):
    client, server = codecs
    payload = client.encode(np.ones(100))
    for cut in (3, 30, len(payload) // 2, len(payload) - 1):
        with pytest.raises(MalformedPayloadError):
            server.validate(payload[:cut], 100)
    # a consistent envelope around a truncated ciphertext
    header, chunks = unpack_payload(payload)
    short = pack_payload(header.codec_id, header.fingerprint, 100, [chunks[0][:-500]])
    with pytest.raises(MalformedPayloadError, match="declares"):
        server.validate(short, 100)


def test_corrupted_ciphertexts_rejected(codecs):
    client, server = codecs
    header, chunks = unpack_payload(client.encode(np.ones(100)))
    chunk = chunks[0]

    def forged(body: bytes) -> bytes:
        return pack_payload(header.codec_id, header.fingerprint, 100, [body])

    garbage = bytes(len(chunk))
    with pytest.raises(MalformedPayloadError, match="SEAL header"):
        server.validate(forged(garbage), 100)
    bad_compression = chunk[:5] + b"\x07" + chunk[6:]
    with pytest.raises(MalformedPayloadError):
        server.validate(forged(bad_compression), 100)
    # valid header, body replaced by random bytes: SEAL must refuse it, not crash
    rng = np.random.default_rng(0)
    noise = chunk[:16] + rng.integers(0, 256, len(chunk) - 16, dtype=np.uint8).tobytes()
    with pytest.raises(MalformedPayloadError, match="deserialize"):
        server.validate(forged(noise), 100)
    # a header that claims a huge ciphertext is refused before SEAL sees it
    magic, hsize, major, minor, compr, rsv, _ = struct.unpack_from("<HBBBBHQ", chunk)
    huge = struct.pack("<HBBBBHQ", magic, hsize, major, minor, compr, rsv, 10**9)
    with pytest.raises(MalformedPayloadError):
        server.validate(forged(huge + chunk[16:]), 100)
    # a ciphertext under other parameters, in an envelope that names our key
    other_cfg = EncryptionConfig(
        poly_modulus_degree=4096, coeff_mod_bit_sizes=(54, 50), plain_modulus_bits=36
    )
    other = BfvCodec.for_client(generate_secret_context(other_cfg), other_cfg)
    alien = unpack_payload(other.encode(np.ones(100)))[1][0]
    with pytest.raises(MalformedPayloadError):
        server.validate(forged(alien), 100)


def test_bundle_checks(bfv_keys):
    secret, _ = bfv_keys
    with pytest.raises(MalformedPayloadError, match="bundle"):
        BfvCodec.for_client(secret[:100], CFG)
    with pytest.raises(MalformedPayloadError, match="differ"):
        BfvCodec.for_client(secret, EncryptionConfig(plain_modulus_bits=40))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_clients": 373}, "noise budget"),
        ({"plain_modulus_bits": 30}, "quantization levels"),
        ({"plain_modulus_bits": 61}, "plain_modulus_bits"),
        ({"update_bound": 0.0}, "update_bound"),
        ({"update_bound": float("inf")}, "update_bound"),
    ],
)
def test_overflow_is_impossible_by_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EncryptionConfig(**kwargs)


def test_config_layout_bounds():
    """The bounds the config promises, checked for several settings."""
    for kw in ({}, {"max_clients": 372}, {"max_clients": 1000, "plain_modulus_bits": 40}):
        cfg = EncryptionConfig(**kw)
        f = cfg.field_bits
        cap = cfg.field_capacity
        # a packed slot of two full fields stays inside (-t/2, t/2) for every t >= 2^(b-1)
        assert cap * (2**f + 1) <= 2 ** (cfg.plain_modulus_bits - 2)
        assert cap < 2 ** (f - 1)
        assert cfg.max_clients * cfg.max_quantized <= cap
        assert cfg.update_bound / cfg.quant_step + 1 <= cfg.max_quantized
        assert 2 * BFV_NOISE_PER_SUMMAND * cfg.max_clients <= 2**cfg.bfv_noise_margin_bits


@pytest.mark.parametrize(("plain_bits", "coeff"), [(40, (60, 40)), (60, (60, 60, 40))])
def test_plain_modulus_never_collides_with_a_coefficient_prime(plain_bits, coeff):
    """A t of the same bit size as a coefficient prime: SEAL would pick that very prime."""
    import tenseal.sealapi as seal

    cfg = EncryptionConfig(max_clients=10, plain_modulus_bits=plain_bits, coeff_mod_bit_sizes=coeff)
    n = cfg.poly_modulus_degree
    primes = [m.value() for m in seal.CoeffModulus.Create(n, list(coeff))]
    naive = seal.PlainModulus.Batching(n, plain_bits).value()
    assert naive in primes  # the collision this guards against is real
    secret = generate_secret_context(cfg)
    client = BfvCodec.for_client(secret, cfg)
    server = BfvCodec.for_server(public_bfv_bundle(secret), cfg)
    t = client.plain_modulus
    assert t not in primes and t % (2 * n) == 1 and t.bit_length() == plain_bits
    assert all(math.gcd(t, q) == 1 for q in primes)
    rng = np.random.default_rng(plain_bits)
    length = PER_CT + 5
    updates = [
        rng.uniform(-cfg.update_bound, cfg.update_bound, length) for _ in range(cfg.max_clients)
    ]
    payloads = [client.encode(x, np.random.default_rng(i)) for i, x in enumerate(updates)]
    ints = [client.quantize(x, np.random.default_rng(i))[0] for i, x in enumerate(updates)]
    total = server.aggregate(payloads, expected_length=length)
    assert client.integer_sum(total).tolist() == np.sum(ints, axis=0).tolist()


def test_plain_modulus_unchanged_without_a_collision(bfv_keys):
    """The default parameters keep SEAL's own batching prime (existing keys stay valid)."""
    import tenseal.sealapi as seal

    client = BfvCodec.for_client(bfv_keys[0], CFG)
    n = CFG.poly_modulus_degree
    assert client.plain_modulus == seal.PlainModulus.Batching(n, CFG.plain_modulus_bits).value()


# --------------------------------------------------------------------------- ring size
# The most clients the default plaintext and data moduli allow (the noise budget's bound).
MOST_CLIENTS = 2**CFG.bfv_noise_margin_bits // (2 * BFV_NOISE_PER_SUMMAND)


@pytest.fixture(scope="module", params=BFV_RINGS)
def ring_codecs(request):
    """Client and server codecs at each ring, sized for the most clients the noise allows."""
    cfg = EncryptionConfig(poly_modulus_degree=request.param, max_clients=MOST_CLIENTS)
    secret = generate_secret_context(cfg)
    return (
        cfg,
        BfvCodec.for_client(secret, cfg),
        BfvCodec.for_server(public_bfv_bundle(secret), cfg),
    )


def test_both_rings_are_128_bit_secure_with_a_batching_plain_modulus(ring_codecs):
    """SEAL accepted the keys at TC128; t is a prime = 1 mod 2N of the configured size."""
    cfg, client, server = ring_codecs
    n = cfg.poly_modulus_degree
    assert sum(cfg.coeff_mod_bit_sizes) <= MAX_COEFF_MODULUS_BITS[n]
    t = client.plain_modulus
    assert t % (2 * n) == 1 and t.bit_length() == cfg.plain_modulus_bits
    assert all(math.gcd(t, q) == 1 for q in server.data_modulus)
    assert client.slots_per_ciphertext == server.slots_per_ciphertext == n
    assert client.poly_modulus_degree == n
    assert key_parameters(public_bfv_bundle(generate_secret_context(cfg))).poly_modulus_degree == n


@pytest.mark.parametrize("offset", [-1, 0, 1, 2 * 8192 + 3])
def test_round_trip_at_both_rings(ring_codecs, offset):
    cfg, client, server = ring_codecs
    length = cfg.values_per_ciphertext + offset
    x = np.random.default_rng(offset % 97).uniform(-cfg.update_bound, cfg.update_bound, length)
    payload = client.encode(x, np.random.default_rng(1))
    q, _ = client.quantize(x, np.random.default_rng(1))
    assert len(unpack_payload(payload)[1]) == bfv_ciphertexts(length, cfg.poly_modulus_degree)
    assert client.integer_sum(server.aggregate([payload], length)).tolist() == q.tolist()
    assert client.slot_count(length) == bfv_ciphertexts(length, cfg.poly_modulus_degree) * (
        cfg.poly_modulus_degree
    )


def test_exact_sum_at_the_most_clients_at_both_rings(ring_codecs):
    """The worst case: every client at +-update_bound in every field, the same noise each.

    Adding one ciphertext to itself ``MOST_CLIENTS`` times adds its noise coherently, the
    largest noise such a sum can hold; the packed fields reach their capacity too.
    """
    cfg, client, server = ring_codecs
    length = cfg.values_per_ciphertext
    x = np.where(np.arange(length) % 3 == 0, cfg.update_bound, -cfg.update_bound)
    q, _ = client.quantize(x, np.random.default_rng(0))
    assert np.max(np.abs(q)) >= cfg.max_quantized - 1  # the largest a bounded value rounds to
    loaded = server.validate(client.encode(x, np.random.default_rng(0)), length)
    total = server.aggregate_loaded([loaded] * MOST_CLIENTS, length)
    assert client.integer_sum(total).tolist() == (q * MOST_CLIENTS).tolist()
    assert client.noise_budget_bits(total) > 0
    # distinct clients' ciphertexts as well
    payloads = [client.encode(x, np.random.default_rng(i)) for i in range(8)]
    ints = sum(client.quantize(x, np.random.default_rng(i))[0] for i in range(8))
    distinct = [server.validate(p, length) for p in payloads]
    sum_all = server.aggregate_loaded([distinct[i % 8] for i in range(MOST_CLIENTS)], length)
    expected = ints * (MOST_CLIENTS // 8) + sum(
        client.quantize(x, np.random.default_rng(i))[0] for i in range(MOST_CLIENTS % 8)
    )
    assert client.integer_sum(sum_all).tolist() == expected.tolist()


@pytest.mark.parametrize("ring", BFV_RINGS)
def test_one_client_more_than_the_noise_allows_is_refused_at_both_rings(ring):
    with pytest.raises(ValueError, match="noise budget"):
        EncryptionConfig(poly_modulus_degree=ring, max_clients=MOST_CLIENTS + 1)
    with pytest.raises(ValueError, match="128-bit security"):
        EncryptionConfig(poly_modulus_degree=ring, coeff_mod_bit_sizes=(60, 60, 60, 59))


def test_small_models_upload_half_the_bytes_at_n4096(ring_codecs):
    """One N = 4096 ciphertext is half an N = 8192 one; so is the aggregate."""
    cfg, client, server = ring_codecs
    x = np.ones(2410)
    up = client.encode(x)
    down = server.aggregate([up] * 3, x.size)
    coefficient_bytes = 8 * cfg.poly_modulus_degree  # one 60-bit data prime, 64-bit words
    assert coefficient_bytes < len(up) < coefficient_bytes + 512
    assert 2 * coefficient_bytes < len(down) < 2 * coefficient_bytes + 512


@pytest.mark.parametrize(
    ("length", "ring"),
    [
        (1, 4096),
        (2 * 4096, 4096),  # the most values one N = 4096 ciphertext holds
        (2 * 4096 + 1, 8192),  # two N = 4096 or one N = 8192: a tie goes to fewer ciphertexts
        (2 * 8192, 8192),
        (2 * 8192 + 1, 4096),  # three N = 4096 (12,288 coefficients) against 16,384
        (3 * 8192, 4096),
        (3 * 8192 + 1, 8192),
    ],
)
def test_ring_choice_at_the_boundaries(length, ring):
    assert bfv_ring_for(length) == ring
    assert CFG.sized_for(length).poly_modulus_degree == ring


@settings(max_examples=200, deadline=None)
@given(length=st.integers(min_value=1, max_value=10**9))
def test_ring_choice_minimises_bytes_then_ciphertexts(length):
    chosen = bfv_ring_for(length)
    coefficients = {n: bfv_ciphertexts(length, n) * n for n in BFV_RINGS}
    assert coefficients[chosen] == min(coefficients.values())
    assert all(n <= chosen for n in BFV_RINGS if coefficients[n] == coefficients[chosen])


def test_sized_for_keeps_what_cannot_change():
    ckks = EncryptionConfig(scheme="ckks")
    assert ckks.sized_for(10) is ckks
    assert EncryptionConfig(scheme="none").sized_for(10).scheme == "none"
    # a coefficient modulus over N = 4096's 109-bit limit stays at the larger ring
    wide = EncryptionConfig(coeff_mod_bit_sizes=(60, 60))
    assert wide.sized_for(10).poly_modulus_degree == 8192
    assert CFG.sized_for(10).to_dict()["poly_modulus_degree"] == 4096
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="vector_length"):
            CFG.sized_for(bad)  # type: ignore[arg-type]


def test_sized_for_fails_fast_where_no_ring_can_be_exact():
    """Settings valid at N = 16384 only: refused with the largest ring's precise reason."""
    wide = EncryptionConfig(poly_modulus_degree=16384, coeff_mod_bit_sizes=(60, 60, 60, 60))
    with pytest.raises(ValueError, match="128-bit security limit of 218 bits for N=8192"):
        wide.sized_for(1000)
