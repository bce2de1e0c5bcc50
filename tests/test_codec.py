from __future__ import annotations

import struct

import numpy as np
import pytest
import tenseal as ts

from sepals.common.ckks import CkksCodec, ckks_abs_tolerance
from sepals.common.codec import PlainCodec, pack_payload, unpack_payload
from sepals.common.config import EncryptionConfig
from sepals.common.errors import (
    ForeignKeyError,
    MalformedPayloadError,
    MissingSecretKeyError,
    NonFiniteUpdateError,
    SecretKeyExposureError,
)
from sepals.common.scheme import context_fingerprint, generate_secret_context

CFG = EncryptionConfig(scheme="ckks")


def _fedavg_case(rng: np.random.Generator, n_clients: int, length: int):
    weights = rng.integers(20, 500, size=n_clients).astype(np.float64)
    models = [rng.normal(0, 0.5, size=length) for _ in range(n_clients)]
    expected = np.sum([w * m for w, m in zip(weights, models, strict=True)], axis=0) / weights.sum()
    return weights, models, expected


@pytest.mark.parametrize("length", [1, 4095, 4096, 9000])
def test_he_aggregate_matches_numpy_fedavg(ckks_keys, length):
    secret, public = ckks_keys
    client = CkksCodec.for_client(secret, CFG)
    server = CkksCodec.for_server(public, CFG)
    rng = np.random.default_rng(length)
    weights, models, expected = _fedavg_case(rng, 7, length)
    payloads = [client.encode(w * m) for w, m in zip(weights, models, strict=True)]
    total = server.aggregate(payloads, expected_length=length)
    decoded = client.decode(total) / weights.sum()
    # the documented bound applies to the weighted sum; dividing by the total shrinks it
    tol = ckks_abs_tolerance(CFG.scale_bits, len(payloads)) / weights.sum()
    assert decoded.shape == (length,)
    assert np.max(np.abs(decoded - expected)) <= tol
    # and the bound is not vacuous: far below the size of the values themselves
    assert tol < 1e-6


def test_plain_codec_matches_fedavg_in_fp32():
    codec = PlainCodec()
    rng = np.random.default_rng(1)
    weights, models, expected = _fedavg_case(rng, 5, 1000)
    payloads = [codec.encode(w * m) for w, m in zip(weights, models, strict=True)]
    total = codec.aggregate(payloads, 1000)
    got = codec.decode(total) / weights.sum()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_server_context_cannot_decrypt(ckks_keys):
    secret, public = ckks_keys
    client = CkksCodec.for_client(secret, CFG)
    server = CkksCodec.for_server(public, CFG)
    payload = client.encode(np.arange(10.0))
    assert not server.can_decrypt
    with pytest.raises(MissingSecretKeyError):
        server.decode(payload)
    # and at the TenSEAL level: the public context has no key to decrypt with
    ctx = ts.context_from(public)
    chunk = unpack_payload(payload)[1][0]
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(ctx, chunk).decrypt()


def test_server_refuses_secret_context(ckks_keys):
    secret, _ = ckks_keys
    with pytest.raises(SecretKeyExposureError):
        CkksCodec.for_server(secret, CFG)


def test_client_requires_secret_context(ckks_keys):
    _, public = ckks_keys
    with pytest.raises(MissingSecretKeyError):
        CkksCodec.for_client(public, CFG)


def test_fingerprint_same_for_secret_and_public(ckks_keys):
    secret, public = ckks_keys
    assert context_fingerprint(secret) == context_fingerprint(public)
    assert (
        CkksCodec.for_client(secret, CFG).fingerprint
        == CkksCodec.for_server(public, CFG).fingerprint
    )


def test_foreign_key_ciphertext_rejected(ckks_keys):
    _, public = ckks_keys
    server = CkksCodec.for_server(public, CFG)
    foreign = CkksCodec.for_client(generate_secret_context(CFG), CFG)
    with pytest.raises(ForeignKeyError, match="made under key"):
        server.validate(foreign.encode(np.ones(100)), 100)


def test_truncated_ciphertext_rejected(ckks_keys):
    secret, public = ckks_keys
    payload = CkksCodec.for_client(secret, CFG).encode(np.ones(100))
    server = CkksCodec.for_server(public, CFG)
    for cut in (10, len(payload) // 2, len(payload) - 1):
        with pytest.raises(MalformedPayloadError):
            server.validate(payload[:cut], 100)


def test_corrupted_ciphertext_body_rejected(ckks_keys):
    """A chunk whose bytes are garbage (header intact) fails deserialization."""
    secret, public = ckks_keys
    payload = CkksCodec.for_client(secret, CFG).encode(np.ones(100))
    header, chunks = unpack_payload(payload)
    garbage = bytes(len(chunks[0]))
    forged = pack_payload(header.codec_id, header.fingerprint, header.length, [garbage])
    with pytest.raises(MalformedPayloadError, match="deserialize"):
        CkksCodec.for_server(public, CFG).validate(forged, 100)


def test_wrong_length_rejected(ckks_keys):
    secret, public = ckks_keys
    payload = CkksCodec.for_client(secret, CFG).encode(np.ones(99))
    server = CkksCodec.for_server(public, CFG)
    with pytest.raises(MalformedPayloadError, match="99 values, expected 100"):
        server.validate(payload, 100)
    # a header that lies about its length is caught by the ciphertext sizes
    header, chunks = unpack_payload(payload)
    lying = pack_payload(header.codec_id, header.fingerprint, 100, chunks)
    with pytest.raises(MalformedPayloadError, match="packs 99 values"):
        server.validate(lying, 100)


def test_bad_magic_and_codec_mismatch(ckks_keys):
    _, public = ckks_keys
    server = CkksCodec.for_server(public, CFG)
    plain = PlainCodec().encode(np.ones(4))
    with pytest.raises(MalformedPayloadError, match="codec id"):
        server.validate(plain, 4)
    with pytest.raises(MalformedPayloadError, match="magic"):
        server.validate(b"XXXX" + plain[4:], 4)
    with pytest.raises(MalformedPayloadError, match="shorter"):
        server.validate(b"", 4)


def test_nan_update_rejected_on_both_sides():
    codec = PlainCodec()
    with pytest.raises(NonFiniteUpdateError):
        codec.encode(np.array([1.0, np.nan]))
    raw = np.array([1.0, np.inf], dtype="<f4").tobytes()
    forged = pack_payload(codec.codec_id, codec.fingerprint, 2, [raw])
    with pytest.raises(NonFiniteUpdateError):
        codec.validate(forged, 2)


def test_nan_update_rejected_before_encryption(ckks_keys):
    secret, _ = ckks_keys
    with pytest.raises(NonFiniteUpdateError):
        CkksCodec.for_client(secret, CFG).encode(np.array([0.0, np.nan, 1.0]))


def test_update_magnitude_bound(ckks_keys):
    secret, _ = ckks_keys
    client = CkksCodec.for_client(secret, CFG)
    bound = CFG.max_update_magnitude
    client.encode(np.array([bound * 0.99]))
    with pytest.raises(ValueError, match="headroom"):
        client.encode(np.array([bound * 1.01]))


def test_payload_header_layout():
    payload = pack_payload(1, b"\x01" * 16, 3, [b"abc", b"de"])
    header, chunks = unpack_payload(payload)
    assert header.length == 3 and header.chunk_sizes == (3, 2) and chunks == [b"abc", b"de"]
    assert struct.unpack_from("<4s", payload)[0] == b"SPL1"
    with pytest.raises(MalformedPayloadError, match="padded"):
        unpack_payload(payload + b"x")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"coeff_mod_bit_sizes": (60,)}, "two primes"),
        ({"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (60, 60)}, "security"),
        ({"coeff_mod_bit_sizes": (60, 70)}, "17..60"),
        ({"scheme": "ckks", "scale_bits": 55}, "headroom"),
        ({"poly_modulus_degree": 1000}, "poly_modulus_degree"),
        ({"max_clients": 0}, "max_clients"),
        ({"scheme": "paillier"}, "scheme"),
    ],
)
def test_encryption_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EncryptionConfig(**kwargs)
