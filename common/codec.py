"""Encoding, encryption and aggregation of flat model-update vectors.

A *payload* is the bytes one party sends: a fixed header followed by chunks::

    magic "SPL1" | codec id (u8) | key fingerprint (16 bytes) | vector length (u64)
    | chunk count (u32) | chunk byte sizes (u32 each) | chunk bytes ...

Three codecs share that envelope and one code path:

* :class:`PlainCodec` sends little-endian fp32 values. The server adds them in the
  clear. It exists so that encrypted and unencrypted runs are directly comparable.
* :class:`~sepals.common.bfv.BfvCodec` (the default, in :mod:`sepals.common.bfv`)
  quantizes with stochastic rounding, packs two integers per BFV slot and sends seeded
  symmetric ciphertexts: about fp32 size; sums are exact.
* :class:`CkksCodec` packs N/2 values per CKKS ciphertext (TenSEAL). The server holds
  only the public context: it can check and add ciphertexts but never decrypt them.

Tolerance of :class:`CkksCodec`: each decoded value of a sum of ``k`` fresh
ciphertexts is within ``k * 2**-(scale_bits - 13)`` of the exact sum (about 1.2e-7 per
client at the default scale 2^36); :data:`CKKS_ABS_TOLERANCE_PER_SUMMAND` holds the
constant and the tests check it.

Key fingerprint: the first 16 bytes of SHA-256 over the public context (public key and
encryption parameters, no secret key). Every payload carries it, so a ciphertext made
under a foreign key is rejected by name before anything is added.
"""

from __future__ import annotations

import hashlib
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from sepals.common.config import EncryptionConfig
from sepals.common.errors import (
    ForeignKeyError,
    MalformedPayloadError,
    MissingSecretKeyError,
    NonFiniteUpdateError,
    SecretKeyExposureError,
)

if TYPE_CHECKING:
    import tenseal as ts

FloatVector = npt.NDArray[np.floating[Any]]

MAGIC = b"SPL1"
CODEC_PLAIN = 1
CODEC_CKKS = 2
_HEADER = struct.Struct("<4sB16sQI")
FINGERPRINT_BYTES = 16
# Measured worst case of fresh CKKS noise is ~2^-(scale_bits-5); 2^-(scale_bits-13)
# leaves a wide margin and is what the tests assert.
CKKS_ABS_TOLERANCE_EXPONENT = 13
PLAIN_FINGERPRINT = hashlib.sha256(b"sepals/plain-fp32").digest()[:FINGERPRINT_BYTES]


def ckks_abs_tolerance(scale_bits: int, summands: int) -> float:
    """Absolute error bound of one decoded value of a sum of ``summands`` ciphertexts."""
    return float(summands) * 2.0 ** -(scale_bits - CKKS_ABS_TOLERANCE_EXPONENT)


@dataclass(frozen=True)
class PayloadHeader:
    """The parsed envelope of a payload."""

    codec_id: int
    fingerprint: bytes
    length: int
    chunk_sizes: tuple[int, ...]


def pack_payload(codec_id: int, fingerprint: bytes, length: int, chunks: Sequence[bytes]) -> bytes:
    """Wrap chunks into a payload envelope."""
    if len(fingerprint) != FINGERPRINT_BYTES:
        raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes, got {len(fingerprint)}")
    head = _HEADER.pack(MAGIC, codec_id, fingerprint, length, len(chunks))
    sizes = struct.pack(f"<{len(chunks)}I", *(len(c) for c in chunks))
    return b"".join([head, sizes, *chunks])


def unpack_payload(data: bytes) -> tuple[PayloadHeader, list[bytes]]:
    """Split a payload into its header and chunks.

    Raises:
        MalformedPayloadError: bad magic, truncated data or trailing bytes.

    """
    if len(data) < _HEADER.size:
        raise MalformedPayloadError(
            f"payload of {len(data)} bytes is shorter than the {_HEADER.size}-byte header"
        )
    magic, codec_id, fingerprint, length, n_chunks = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MalformedPayloadError(f"bad payload magic {magic!r}, expected {MAGIC!r}")
    sizes_end = _HEADER.size + 4 * n_chunks
    if len(data) < sizes_end:
        raise MalformedPayloadError(f"payload truncated inside its table of {n_chunks} chunks")
    sizes = struct.unpack_from(f"<{n_chunks}I", data, _HEADER.size)
    if sizes_end + sum(sizes) != len(data):
        raise MalformedPayloadError(
            f"payload holds {len(data) - sizes_end} chunk bytes but its header declares "
            f"{sum(sizes)} (truncated or padded)"
        )
    chunks: list[bytes] = []
    offset = sizes_end
    for size in sizes:
        chunks.append(data[offset : offset + size])
        offset += size
    return PayloadHeader(codec_id, fingerprint, length, tuple(sizes)), chunks


class UpdateCodec(ABC):
    """Turns flat float vectors into payloads, adds payloads, and decodes sums.

    Server-side instances can :meth:`validate` and :meth:`aggregate`; client-side
    instances can also :meth:`encode` and :meth:`decode`.
    """

    codec_id: ClassVar[int]
    name: ClassVar[str]
    # The settings that sized an HE codec (its subclasses set it); none for plaintext.
    _config: EncryptionConfig | None = None

    @property
    def encryption(self) -> EncryptionConfig | None:
        """The encryption settings this codec was built with (``None``: plaintext)."""
        return self._config

    @property
    def poly_modulus_degree(self) -> int:
        """The HE ring degree N of this codec's keys (0: plaintext, no ring)."""
        return 0 if self._config is None else self._config.poly_modulus_degree

    @property
    @abstractmethod
    def fingerprint(self) -> bytes:
        """16-byte identifier of the key material (or of the plain codec)."""

    @property
    def fingerprint_hex(self) -> str:
        """The fingerprint as hex, for logs and manifests."""
        return self.fingerprint.hex()

    def encode(self, vector: FloatVector, rng: np.random.Generator | None = None) -> bytes:
        """Encode (and, for HE codecs, encrypt) a flat vector into a payload."""
        return self.encode_update(vector, rng)[0]

    @abstractmethod
    def encode_update(
        self, vector: FloatVector, rng: np.random.Generator | None = None
    ) -> tuple[bytes, float | None]:
        """Encode a flat vector; also return the largest absolute encoding error.

        The error is measured on the client before encryption (``None`` when the codec
        cannot measure it, as for CKKS, whose error appears only on decryption). It is
        a rounding error, at most one quantization step, not a statistic of the update.
        ``rng`` drives stochastic rounding where a codec uses it (``None``: OS entropy).
        """

    @abstractmethod
    def decode(self, payload: bytes) -> npt.NDArray[np.float64]:
        """Decode (and decrypt) a payload into a flat float64 vector."""

    @abstractmethod
    def _load_chunks(self, header: PayloadHeader, chunks: list[bytes]) -> list[Any]:
        """Deserialize and check the chunks of a payload whose header is valid."""

    @abstractmethod
    def _sum_chunks(
        self, loaded: Sequence[list[Any]], slot_offset: npt.NDArray[np.uint64] | None = None
    ) -> list[bytes]:
        """Add the loaded chunks of several payloads, chunk by chunk.

        ``slot_offset`` (BFV only) is a plaintext added to the sum's slots modulo t: the
        negated masks when masking is on.
        """

    def check_header(self, header: PayloadHeader, expected_length: int | None) -> None:
        """Check codec id, key fingerprint and vector length of a payload header."""
        if header.codec_id != self.codec_id:
            raise MalformedPayloadError(
                f"payload uses codec id {header.codec_id}, this party expects "
                f"{self.codec_id} ({self.name})"
            )
        if header.fingerprint != self.fingerprint:
            raise ForeignKeyError(
                f"payload was made under key {header.fingerprint.hex()}, this federation "
                f"uses key {self.fingerprint_hex}"
            )
        if expected_length is not None and header.length != expected_length:
            raise MalformedPayloadError(
                f"payload encodes {header.length} values, expected {expected_length}"
            )

    def validate(self, payload: bytes, expected_length: int | None = None) -> list[Any]:
        """Fully check a payload and return its deserialized chunks.

        Raises:
            MalformedPayloadError: bad envelope, wrong length or undecodable chunk.
            ForeignKeyError: the payload was made under another key.
            NonFiniteUpdateError: a plaintext payload holds NaN or infinity.

        """
        header, chunks = unpack_payload(payload)
        self.check_header(header, expected_length)
        return self._load_chunks(header, chunks)

    def aggregate(self, payloads: Sequence[bytes], expected_length: int | None = None) -> bytes:
        """Add payloads element-wise and return the sum as a payload.

        Every payload is validated first; the first invalid one raises. Callers that
        must exclude bad inputs one by one call :meth:`validate` on each first and pass
        :meth:`aggregate_loaded` the survivors.
        """
        if not payloads:
            raise ValueError("aggregate needs at least one payload")
        loaded = [self.validate(p, expected_length) for p in payloads]
        length = unpack_payload(payloads[0])[0].length
        return self.aggregate_loaded(loaded, length)

    def aggregate_loaded(
        self,
        loaded: Sequence[list[Any]],
        length: int,
        slot_offset: npt.NDArray[np.uint64] | None = None,
    ) -> bytes:
        """Add payloads that :meth:`validate` already returned (and ``slot_offset``).

        Raises:
            ValueError: nothing to add, or a slot offset for a codec without slots.

        """
        if not loaded:
            raise ValueError("aggregate_loaded needs at least one validated payload")
        chunks = self._sum_chunks(loaded, slot_offset)
        return pack_payload(self.codec_id, self.fingerprint, length, chunks)


def _no_slots(codec: UpdateCodec, slot_offset: object) -> None:
    if slot_offset is not None:
        raise ValueError(f"codec {codec.name} has no integer slots to offset (masking is BFV only)")


def _as_finite_vector(vector: FloatVector) -> npt.NDArray[np.float64]:
    arr = np.asarray(vector, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"expected a flat vector, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        # The reason travels to the server: it names the fault, not how much of the
        # update is affected.
        raise NonFiniteUpdateError("update holds NaN or infinite values")
    return arr


class PlainCodec(UpdateCodec):
    """Little-endian fp32 values, added in the clear (encryption off)."""

    codec_id = CODEC_PLAIN
    name = "plain-fp32"

    @property
    def fingerprint(self) -> bytes:
        """Fixed identifier of the plaintext codec."""
        return PLAIN_FINGERPRINT

    def encode_update(
        self, vector: FloatVector, rng: np.random.Generator | None = None
    ) -> tuple[bytes, float | None]:
        """Serialize the vector as fp32; the error is that of rounding to fp32."""
        arr = _as_finite_vector(vector)
        f32 = arr.astype("<f4")
        error = float(np.max(np.abs(arr - f32))) if arr.size else 0.0
        return pack_payload(self.codec_id, self.fingerprint, arr.size, [f32.tobytes()]), error

    def decode(self, payload: bytes) -> npt.NDArray[np.float64]:
        """Deserialize an fp32 payload."""
        (values,) = self.validate(payload)
        return np.asarray(values, dtype=np.float64)

    def _load_chunks(self, header: PayloadHeader, chunks: list[bytes]) -> list[Any]:
        if len(chunks) != 1 or header.chunk_sizes[0] != 4 * header.length:
            raise MalformedPayloadError(
                f"plain payload must hold one chunk of {4 * header.length} bytes"
            )
        values = np.frombuffer(chunks[0], dtype="<f4")
        if not np.all(np.isfinite(values)):
            raise NonFiniteUpdateError("plain update holds NaN or infinite values")
        return [values]

    def _sum_chunks(
        self, loaded: Sequence[list[Any]], slot_offset: npt.NDArray[np.uint64] | None = None
    ) -> list[bytes]:
        _no_slots(self, slot_offset)
        total = np.zeros_like(loaded[0][0], dtype=np.float64)
        for (values,) in loaded:
            total += values
        return [total.astype("<f4").tobytes()]


def _serialize_public(ctx: ts.Context) -> bytes:
    return bytes(
        ctx.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )


def generate_secret_context(config: EncryptionConfig) -> bytes:
    """Create fresh keys for ``config`` and return the clients' serialized secret context.

    For ``bfv`` this is a sepals key bundle (:mod:`sepals.common.bfv`), for ``ckks`` a
    TenSEAL context. The result holds the secret key: it is for clients only. Derive the
    server's context with :func:`public_context_bytes`.
    """
    import tenseal as ts

    if config.scheme == "bfv":
        from sepals.common.bfv import generate_bfv_bundle

        return generate_bfv_bundle(config)
    if config.scheme != "ckks":
        raise ValueError(f"cannot generate keys for scheme {config.scheme!r}")
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


def _fingerprint_of(ctx: ts.Context) -> bytes:
    return hashlib.sha256(_serialize_public(ctx)).digest()[:FINGERPRINT_BYTES]


def public_context_bytes(secret_context: bytes) -> bytes:
    """Strip the secret key from a serialized context (BFV bundle or TenSEAL context)."""
    import tenseal as ts

    from sepals.common.bfv import is_bfv_bundle, public_bfv_bundle

    if is_bfv_bundle(secret_context):
        return public_bfv_bundle(secret_context)
    return _serialize_public(ts.context_from(secret_context))


def context_fingerprint(context: bytes) -> bytes:
    """Fingerprint of a serialized context (secret or public: same key, same value)."""
    import tenseal as ts

    from sepals.common.bfv import bfv_fingerprint, is_bfv_bundle

    if is_bfv_bundle(context):
        return bfv_fingerprint(context)
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

        arr = _as_finite_vector(vector)
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

    def _sum_chunks(
        self, loaded: Sequence[list[Any]], slot_offset: npt.NDArray[np.uint64] | None = None
    ) -> list[bytes]:
        _no_slots(self, slot_offset)
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


def make_client_codec(config: EncryptionConfig, secret_context: bytes | None) -> UpdateCodec:
    """The codec a client uses for ``config``: plain, BFV or CKKS with the secret key."""
    if not config.enabled:
        return PlainCodec()
    if secret_context is None:
        raise MissingSecretKeyError("encryption is on but no secret context was given")
    if config.scheme == "bfv":
        from sepals.common.bfv import BfvCodec

        return BfvCodec.for_client(secret_context, config)
    return CkksCodec.for_client(secret_context, config)


def make_server_codec(config: EncryptionConfig, public_context: bytes | None) -> UpdateCodec:
    """The codec the server uses for ``config``: plain, BFV or CKKS with the public context."""
    if not config.enabled:
        return PlainCodec()
    if public_context is None:
        raise ValueError("encryption is on but no public context was given to the server")
    if config.scheme == "bfv":
        from sepals.common.bfv import BfvCodec

        return BfvCodec.for_server(public_context, config)
    return CkksCodec.for_server(public_context, config)
