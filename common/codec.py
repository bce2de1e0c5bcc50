"""Encoding, encryption and aggregation of flat model-update vectors.

A *payload* is the bytes one party sends: a fixed header followed by chunks::

    magic "SPL1" | codec id (u8) | key fingerprint (16 bytes) | vector length (u64)
    | chunk count (u32) | chunk byte sizes (u32 each) | chunk bytes ...

Three codecs share that envelope and one code path (:mod:`sepals.common.scheme` picks one):

* :class:`PlainCodec` sends little-endian fp32 values. The server adds them in the
  clear. It exists so that encrypted and unencrypted runs are directly comparable.
* :class:`~sepals.common.bfv.BfvCodec` (the default, in :mod:`sepals.common.bfv`)
  quantizes with stochastic rounding, packs two integers per BFV slot and sends seeded
  symmetric ciphertexts: about fp32 size; sums are exact.
* :class:`~sepals.common.ckks.CkksCodec` packs N/2 values per CKKS ciphertext
  (TenSEAL). The server holds only the public context: it can check and add
  ciphertexts but never decrypt them.

Key fingerprint: the first 16 bytes of SHA-256 over the public context (public key and
encryption parameters, no secret key). Every payload carries it, so a ciphertext made
under a foreign key is rejected by name before anything is added.

A client's upload is checked by :meth:`UpdateCodec.validate_upload`: it must be the one
encoding its codec accepts (for BFV, :mod:`sepals.common.seal_canon`), and it yields
*replay keys* computed from the parsed ciphertexts, never from the raw bytes, so that the
server can refuse a ciphertext it accepted before however it is re-encoded.
"""

from __future__ import annotations

import hashlib
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from sepals.common.config import EncryptionConfig
from sepals.common.errors import (
    ForeignKeyError,
    GlobalModelRejectedError,
    MalformedPayloadError,
    NonFiniteUpdateError,
)

FloatVector = npt.NDArray[np.floating[Any]]

MAGIC = b"SPL1"
CODEC_PLAIN = 1
CODEC_CKKS = 2
_HEADER = struct.Struct("<4sB16sQI")
FINGERPRINT_BYTES = 16
PLAIN_FINGERPRINT = hashlib.sha256(b"sepals/plain-fp32").digest()[:FINGERPRINT_BYTES]
#: Bytes of a replay key: the first 8 of a domain-separated SHA-256.
REPLAY_KEY_BYTES = 8


def replay_key(domain: bytes, data: bytes | memoryview) -> int:
    """A 64-bit key of ``data`` (a parsed part of a ciphertext), unique to ``domain``.

    Keys only ever make uploads look *alike*: an upload whose key was seen is refused, so
    a shorter key cannot let a replay through. Two different honest ciphertexts share a
    key with probability about ``n**2 / 2**65`` over ``n`` accepted keys (3e-6 at ten
    million), which costs that client one round.
    """
    digest = hashlib.sha256(b"sepals/replay/" + domain + b"\x00")
    digest.update(data)
    return int.from_bytes(digest.digest()[:REPLAY_KEY_BYTES], "little")


@dataclass(frozen=True)
class PayloadHeader:
    """The parsed envelope of a payload."""

    codec_id: int
    fingerprint: bytes
    length: int
    chunk_sizes: tuple[int, ...]


@dataclass(frozen=True)
class CheckedUpload:
    """A client's upload that passed every check of :meth:`UpdateCodec.validate_upload`.

    Attributes:
        loaded: The deserialized chunks, ready for :meth:`UpdateCodec.aggregate_loaded`.
        replay_keys: Keys of the parsed ciphertexts (see :func:`replay_key`); the server
            refuses an upload any of whose keys it accepted before.

    """

    loaded: list[Any]
    replay_keys: tuple[int, ...]


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
    def value_bound(self) -> float | None:
        """Largest absolute value one client may encode (``None``: no bound, plaintext).

        BFV: ``update_bound``; CKKS: what ``max_clients`` such values can sum to inside
        its headroom (:attr:`EncryptionConfig.max_update_magnitude`).
        """
        return None if self._config is None else self._config.max_update_magnitude

    @property
    def can_decrypt(self) -> bool:
        """Whether this instance holds a secret key (never true for a plaintext codec)."""
        return False

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

    def decode_aggregate(self, payload: bytes, summands: int | None) -> npt.NDArray[np.float64]:
        """Decode a sum of ``summands`` updates, refusing one that no such sum can be.

        Here: every value must be finite and, where the codec bounds what one client
        encodes (:attr:`value_bound`), within ``summands`` times that bound (``None``:
        ``max_clients`` times). The BFV codec checks the exact integers instead.

        Raises:
            GlobalModelRejectedError: the sum is out of that range.

        """
        values = self.decode(payload)
        if not np.all(np.isfinite(values)):
            raise GlobalModelRejectedError("global model holds non-finite values")
        bound = self.value_bound
        if bound is not None and self._config is not None:
            count = self._config.max_clients if summands is None else summands
            limit = count * bound * (1.0 + 1e-6) + 1e-6
            beyond = int(np.count_nonzero(np.abs(values) > limit))
            if beyond:
                raise GlobalModelRejectedError(
                    f"global model out of range: {beyond} of {values.size} values beyond what "
                    f"{count} bounded updates can sum to"
                )
        return values

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

    def validate_upload(self, payload: bytes, expected_length: int | None = None) -> CheckedUpload:
        """Check a client's upload in the one encoding this codec accepts; key its content.

        Stricter than :meth:`validate` (which also reads sums and checkpoints): every chunk
        must be the codec's canonical encoding. The replay keys come from the parsed
        ciphertexts, so every encoding of an accepted ciphertext has its keys.

        Raises:
            MalformedPayloadError: not the canonical encoding, or the same ciphertext
                twice in one upload; or as :meth:`validate`.
            ForeignKeyError: the payload was made under another key.
            NonFiniteUpdateError: a plaintext payload holds NaN or infinity.

        """
        header, chunks = unpack_payload(payload)
        self.check_header(header, expected_length)
        checked = self._admit_chunks(header, chunks)
        if len(set(checked.replay_keys)) != len(checked.replay_keys):
            raise MalformedPayloadError("the upload holds the same ciphertext twice")
        return checked

    @abstractmethod
    def _admit_chunks(self, header: PayloadHeader, chunks: list[bytes]) -> CheckedUpload:
        """Check that each chunk is canonical, load it, and key it."""

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


def refuse_slot_offset(codec: UpdateCodec, slot_offset: object) -> None:
    """Refuse a slot offset (a mask) for a codec without integer slots."""
    if slot_offset is not None:
        raise ValueError(f"codec {codec.name} has no integer slots to offset (masking is BFV only)")


def as_finite_vector(vector: FloatVector) -> npt.NDArray[np.float64]:
    """``vector`` as a flat float64 array, refusing other shapes and non-finite values."""
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
        arr = as_finite_vector(vector)
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

    def _admit_chunks(self, header: PayloadHeader, chunks: list[bytes]) -> CheckedUpload:
        """fp32 values of exactly the declared length; keyed by their values.

        The key is over the values with -0.0 read as 0.0 (NaN and infinity are refused),
        so two payloads that hold the same numbers have the same key.
        """
        (values,) = self._load_chunks(header, chunks)
        canonical = (values + np.float32(0.0)).astype("<f4")
        return CheckedUpload([values], (replay_key(b"plain-fp32", canonical.tobytes()),))

    def _sum_chunks(
        self, loaded: Sequence[list[Any]], slot_offset: npt.NDArray[np.uint64] | None = None
    ) -> list[bytes]:
        refuse_slot_offset(self, slot_offset)
        total = np.zeros_like(loaded[0][0], dtype=np.float64)
        for (values,) in loaded:
            total += values
        return [total.astype("<f4").tobytes()]
