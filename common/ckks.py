"""CKKS ciphertexts of flat update vectors through TenSEAL: N/2 values per ciphertext.

The server holds only the public context: it can check and add ciphertexts but never
decrypt them. Tolerance: each decoded value of a sum of ``k`` fresh ciphertexts is
within ``k * 2**-(scale_bits - 13)`` of the exact sum (about 1.2e-7 per client at the
default scale 2^36); :func:`ckks_abs_tolerance` gives the bound and the tests check it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from sepals.common.codec import (
    CODEC_CKKS,
    FINGERPRINT_BYTES,
    CheckedUpload,
    FloatVector,
    PayloadHeader,
    UpdateCodec,
    as_finite_vector,
    pack_payload,
    refuse_slot_offset,
    replay_key,
)
from sepals.common.config import EncryptionConfig
from sepals.common.errors import (
    MalformedPayloadError,
    MissingSecretKeyError,
    SecretKeyExposureError,
)

if TYPE_CHECKING:
    import tenseal as ts

# Measured worst case of fresh CKKS noise is ~2^-(scale_bits-5); 2^-(scale_bits-13)
# leaves a wide margin and is what the tests assert.
CKKS_ABS_TOLERANCE_EXPONENT = 13


def ckks_abs_tolerance(scale_bits: int, summands: int) -> float:
    """Absolute error bound of one decoded value of a sum of ``summands`` ciphertexts."""
    return float(summands) * 2.0 ** -(scale_bits - CKKS_ABS_TOLERANCE_EXPONENT)


def _serialize_public(ctx: ts.Context) -> bytes:
    return bytes(
        ctx.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def _fingerprint_of(ctx: ts.Context) -> bytes:
    return hashlib.sha256(_serialize_public(ctx)).digest()[:FINGERPRINT_BYTES]


def generate_ckks_context(config: EncryptionConfig) -> bytes:
    """A fresh serialized TenSEAL CKKS context for ``config``, with its secret key."""
    import tenseal as ts

    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=config.poly_modulus_degree,
        coeff_mod_bit_sizes=list(config.coeff_mod_bit_sizes),
    )
    ctx.global_scale = 2.0**config.scale_bits
    return bytes(
        ctx.serialize(
            save_public_key=True,
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def public_ckks_context(secret_context: bytes) -> bytes:
    """A serialized CKKS context without its secret key."""
    import tenseal as ts

    return _serialize_public(ts.context_from(secret_context))


def ckks_fingerprint(context: bytes) -> bytes:
    """Fingerprint of a serialized CKKS context (secret or public: same key, same value)."""
    import tenseal as ts

    return _fingerprint_of(ts.context_from(context))


class CkksCodec(UpdateCodec):
    """CKKS ciphertexts with N/2 values per ciphertext, via TenSEAL.

    Build a server-side instance with :meth:`for_server` (public context only; a secret
    context is refused) and a client-side one with :meth:`for_client`.
    """

    codec_id = CODEC_CKKS
    name = "ckks"
    _config: EncryptionConfig

    def __init__(self, context: ts.Context, config: EncryptionConfig) -> None:
        self._ctx = context
        self._config = config
        self._fingerprint = _fingerprint_of(context)

    @classmethod
    def for_server(cls, public_context: bytes, config: EncryptionConfig) -> CkksCodec:
        """Load a public context for aggregation.

        Raises:
            SecretKeyExposureError: the context contains a secret key.
            MalformedPayloadError: the bytes are not a TenSEAL context.

        """
        ctx = cls._load(public_context)
        if ctx.has_secret_key() or not ctx.is_public():
            raise SecretKeyExposureError(
                "refusing a CKKS context that holds a secret key: the server must only "
                "ever receive the public context (see `public_context_bytes`)"
            )
        return cls(ctx, config)

    @classmethod
    def for_client(cls, secret_context: bytes, config: EncryptionConfig) -> CkksCodec:
        """Load the shared secret context of the clients.

        Raises:
            MissingSecretKeyError: the context has no secret key.

        """
        ctx = cls._load(secret_context)
        if not ctx.has_secret_key():
            raise MissingSecretKeyError("a client needs the secret CKKS context to decrypt")
        ctx.global_scale = 2.0**config.scale_bits
        return cls(ctx, config)

    @staticmethod
    def _load(data: bytes) -> ts.Context:
        import tenseal as ts

        try:
            return ts.context_from(data)
        except Exception as exc:
            raise MalformedPayloadError(f"not a TenSEAL context: {exc}") from exc

    @property
    def fingerprint(self) -> bytes:
        """Fingerprint of this codec's key."""
        return self._fingerprint

    @property
    def can_decrypt(self) -> bool:
        """Whether this instance holds the secret key."""
        return bool(self._ctx.has_secret_key())

    def _expected_chunk_lengths(self, length: int) -> list[int]:
        slots = self._config.slots
        full, rest = divmod(length, slots)
        return [slots] * full + ([rest] if rest else [])

    def encode_update(
        self, vector: FloatVector, rng: np.random.Generator | None = None
    ) -> tuple[bytes, float | None]:
        """Encrypt a flat vector, N/2 values per ciphertext (the error is not measured).

        Raises:
            NonFiniteUpdateError: the vector holds NaN or infinity.
            ValueError: a value exceeds :attr:`EncryptionConfig.max_update_magnitude`.

        """
        import tenseal as ts

        arr = as_finite_vector(vector)
        bound = self._config.max_update_magnitude
        peak = float(np.max(np.abs(arr))) if arr.size else 0.0
        if peak > bound:
            raise ValueError(
                f"update magnitude exceeds {bound:.4g}, the per-client bound that keeps a sum "
                f"of max_clients={self._config.max_clients} updates inside the CKKS headroom; "
                "lower max_clients, scale_bits or the update weights"
            )
        slots = self._config.slots
        chunks = [
            ts.ckks_vector(self._ctx, arr[i : i + slots].tolist()).serialize()
            for i in range(0, arr.size, slots)
        ]
        return pack_payload(self.codec_id, self.fingerprint, arr.size, chunks), None

    def _load_chunks(self, header: PayloadHeader, chunks: list[bytes]) -> list[Any]:
        import tenseal as ts

        expected = self._expected_chunk_lengths(header.length)
        if len(chunks) != len(expected):
            raise MalformedPayloadError(
                f"payload of {header.length} values must hold {len(expected)} ciphertexts, "
                f"holds {len(chunks)}"
            )
        loaded = []
        for i, (chunk, want) in enumerate(zip(chunks, expected, strict=True)):
            try:
                vec = ts.ckks_vector_from(self._ctx, chunk)
            except Exception as exc:
                raise MalformedPayloadError(f"ciphertext {i} does not deserialize: {exc}") from exc
            if vec.size() != want:
                raise MalformedPayloadError(
                    f"ciphertext {i} packs {vec.size()} values, expected {want}"
                )
            loaded.append(vec)
        return loaded

    def _admit_chunks(self, header: PayloadHeader, chunks: list[bytes]) -> CheckedUpload:
        """Each chunk exactly as TenSEAL re-serializes what it loaded; keyed by those bytes.

        TenSEAL's serialization of a loaded vector is deterministic, so requiring the
        chunk to equal it leaves one encoding per ciphertext, and a key of the bytes is a
        key of the ciphertext.
        """
        loaded = self._load_chunks(header, chunks)
        keys = []
        for i, (chunk, vec) in enumerate(zip(chunks, loaded, strict=True)):
            if bytes(vec.serialize()) != chunk:
                raise MalformedPayloadError(
                    f"ciphertext {i} is not in TenSEAL's own encoding of it (re-compressed, "
                    "padded or with fields reordered)"
                )
            keys.append(replay_key(b"ckks", chunk))
        return CheckedUpload(loaded, tuple(keys))

    def _sum_chunks(
        self, loaded: Sequence[list[Any]], slot_offset: npt.NDArray[np.uint64] | None = None
    ) -> list[bytes]:
        refuse_slot_offset(self, slot_offset)
        if len(loaded) > self._config.max_clients:
            raise ValueError(
                f"refusing to add {len(loaded)} updates: max_clients={self._config.max_clients} "
                "bounds the sum inside the CKKS headroom"
            )
        totals = [vec.copy() for vec in loaded[0]]
        for payload in loaded[1:]:
            for total, vec in zip(totals, payload, strict=True):
                total.add_(vec)
        return [bytes(t.serialize()) for t in totals]

    def decode(self, payload: bytes) -> npt.NDArray[np.float64]:
        """Decrypt a payload (needs the secret key)."""
        if not self.can_decrypt:
            raise MissingSecretKeyError("this CKKS context holds no secret key and cannot decrypt")
        loaded = self.validate(payload)
        if not loaded:
            return np.zeros(0, dtype=np.float64)
        return np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in loaded])
