"""The one encoding of an uploaded BFV ciphertext: uncompressed and seeded, byte for byte.

SEAL (as TenSEAL ships it) loads the same ciphertext from many encodings: uncompressed,
zlib or zstd at any level, with bytes after the compressed stream, with its header's
reserved bytes set, with a seed record that names another PRNG. A digest of the bytes
therefore does not recognise a ciphertext that is sent again. sepals accepts exactly one
encoding for a client's upload, SEAL's own seeded serialization without compression::

    SEAL header   magic A15E, header size 16, SEAL's version, compression 0 (none),
                  reserved 0, size (u64) = the whole ciphertext: 194 + 8 N k bytes
    metadata      parms id of the data level (4 x u64), NTT form 0 (1 byte), size 2,
                  degree N, primes k (u64 each), scale 1.0 (f64), correction factor 1 (u64)
    c0            a SEAL array: its own header (compression 0, reserved 0, size
                  24 + 8 N k), the word count N k (u64), then N k coefficient words (u64)
    seed record   its own header (compression 0, reserved 0, size 81), the PRNG type
                  (1 byte: Blake2xb) and the 64-byte seed from which SEAL expands c1

Everything but c0 and the seed is fixed by the federation's parameters, so a chunk is
accepted only if it is ``prefix + c0 + middle + seed`` with this federation's
:class:`SeededLayout`; SEAL then loads it (refusing any coefficient at or above its
prime) and expands c1 from the seed.

SEAL writes its default compression (zstd in TenSEAL's build) and offers no other from
Python, so a client re-emits what SEAL wrote in this form (:meth:`SeededLayout.from_seal`),
checking every fixed field on the way: what the client sends is what the server accepts.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from functools import cached_property

import zstandard

from sepals.common.errors import MalformedPayloadError

SEAL_MAGIC = 0xA15E
SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr, rsv, size
COMPR_NONE, COMPR_ZLIB, COMPR_ZSTD = 0, 1, 2
_COMPR_NAMES = {COMPR_ZLIB: "zlib", COMPR_ZSTD: "zstd"}
#: SEAL's PRNG type of a seed record that SEAL's default factory writes.
PRNG_BLAKE2XB = 1
SEED_BYTES = 64
_META = struct.Struct("<32sBQQQdQ")  # parms id, NTT form, size, N, k, scale, correction
_COUNT = struct.Struct("<Q")


@dataclass(frozen=True)
class SeededLayout:
    """The canonical bytes of a fresh seeded ciphertext for one set of BFV parameters.

    Args:
        parms_id: The data level's parms id (four 64-bit words).
        degree: The ring degree N.
        primes: The number k of coefficient primes at the data level.
        version: SEAL's serialization version ``(major, minor)``.

    """

    parms_id: tuple[int, ...]
    degree: int
    primes: int
    version: tuple[int, int]

    def __post_init__(self) -> None:
        if len(self.parms_id) != 4 or self.degree < 1 or self.primes < 1:
            raise ValueError("a seeded layout needs a 4-word parms id, N >= 1 and k >= 1")

    @property
    def words(self) -> int:
        """Coefficient words of c0: N k."""
        return self.degree * self.primes

    def _header(self, size: int) -> bytes:
        major, minor = self.version
        return SEAL_HEADER.pack(SEAL_MAGIC, SEAL_HEADER.size, major, minor, COMPR_NONE, 0, size)

    @cached_property
    def prefix(self) -> bytes:
        """Everything before c0's words: header, metadata, c0's array header and count."""
        meta = _META.pack(
            struct.pack("<4Q", *self.parms_id), 0, 2, self.degree, self.primes, 1.0, 1
        )
        array = self._header(SEAL_HEADER.size + _COUNT.size + 8 * self.words)
        return self._header(self.size) + meta + array + _COUNT.pack(self.words)

    @cached_property
    def middle(self) -> bytes:
        """Between c0's words and the seed: the seed record's header and PRNG type."""
        return self._header(SEAL_HEADER.size + 1 + SEED_BYTES) + bytes([PRNG_BLAKE2XB])

    @property
    def size(self) -> int:
        """Bytes of one canonical ciphertext: 194 + 8 N k."""
        return _FIXED_BYTES + 8 * self.words

    def parse(self, i: int, chunk: bytes) -> tuple[memoryview, memoryview]:
        """``(c0 words, seed)`` of ciphertext ``i``, if ``chunk`` is the canonical encoding.

        Raises:
            MalformedPayloadError: anything else, saying what differs.

        """
        check_seal_header(i, chunk, self.version)
        if len(chunk) != self.size:
            raise MalformedPayloadError(
                f"ciphertext {i} has {len(chunk)} bytes; an uncompressed seeded ciphertext "
                f"of these parameters has exactly {self.size} (unseeded, padded or cut)"
            )
        view = memoryview(chunk)
        c0_end = len(self.prefix) + 8 * self.words
        seed_start = c0_end + len(self.middle)
        if view[: len(self.prefix)] != self.prefix or view[c0_end:seed_start] != self.middle:
            raise MalformedPayloadError(
                f"ciphertext {i}: {self._first_difference(view, c0_end)} differs from a "
                "fresh seeded ciphertext of this federation's parameters"
            )
        return view[len(self.prefix) : c0_end], view[seed_start:]

    def _first_difference(self, view: memoryview, c0_end: int) -> str:
        """The first fixed field of ``view`` that differs from this layout's."""
        for what, start, end in _PREFIX_FIELDS:
            if view[start:end] != self.prefix[start:end]:
                return what
        if view[c0_end : c0_end + SEAL_HEADER.size] != self.middle[: SEAL_HEADER.size]:
            return "seed record header"
        return "PRNG type"

    def from_seal(self, blob: bytes) -> bytes:
        """The canonical encoding of a seeded ciphertext as SEAL saved it (any compression).

        Raises:
            MalformedPayloadError: ``blob`` is not a seeded ciphertext of these parameters
                (for example, SEAL's default PRNG is not Blake2xb in this build).

        """
        try:
            if len(blob) < SEAL_HEADER.size:
                raise MalformedPayloadError("less than a SEAL header")
            _, _, _, _, compr, _, size = SEAL_HEADER.unpack_from(blob)
            body = memoryview(blob)[SEAL_HEADER.size : size]
            # One byte more than fits: a longer stream then fails the length check.
            limit = self.size - SEAL_HEADER.size + 1
            if compr == COMPR_ZSTD:
                members = zstandard.ZstdDecompressor().decompress(body, max_output_size=limit)
            elif compr == COMPR_ZLIB:
                members = zlib.decompressobj().decompress(body, limit)
            else:
                members = bytes(body)
            canonical = self._header(self.size) + members
            self.parse(0, canonical)
        except (MalformedPayloadError, zstandard.ZstdError, zlib.error) as exc:
            raise MalformedPayloadError(
                f"SEAL saved a seeded ciphertext in an unexpected layout ({exc})"
            ) from exc
        return canonical


# Bytes of a canonical ciphertext besides c0's words: three SEAL headers, the metadata,
# the word count, the PRNG type and the seed.
_FIXED_BYTES = 3 * SEAL_HEADER.size + _META.size + _COUNT.size + 1 + SEED_BYTES
# The fixed fields before c0's words: (what, start, end).
_PREFIX_FIELDS = (
    ("SEAL header", 0, 16),
    ("parms id", 16, 48),
    ("NTT form", 48, 49),
    ("size (number of polynomials)", 49, 57),
    ("ring degree", 57, 65),
    ("number of primes", 65, 73),
    ("scale", 73, 81),
    ("correction factor", 81, 89),
    ("coefficient array header", 89, 105),
    ("coefficient count", 105, 113),
)


def check_seal_header(i: int, chunk: bytes, version: tuple[int, int]) -> None:
    """Refuse ciphertext ``i`` unless its SEAL header is the canonical one for its length.

    Raises:
        MalformedPayloadError: no SEAL header, another SEAL version, compression,
            reserved bytes set, or a declared size other than the chunk's length.

    """
    if len(chunk) < SEAL_HEADER.size:
        raise MalformedPayloadError(f"ciphertext {i} is shorter than a SEAL header")
    magic, head_size, major, minor, compr, reserved, size = SEAL_HEADER.unpack_from(chunk)
    if magic != SEAL_MAGIC or head_size != SEAL_HEADER.size:
        raise MalformedPayloadError(f"ciphertext {i} has no valid SEAL header")
    if (major, minor) != version:
        raise MalformedPayloadError(
            f"ciphertext {i} names SEAL version {major}.{minor}; this federation's SEAL "
            f"writes {version[0]}.{version[1]}"
        )
    if compr != COMPR_NONE:
        name = _COMPR_NAMES.get(compr, f"mode {compr}")
        raise MalformedPayloadError(
            f"ciphertext {i} is compressed ({name}); an upload must be an uncompressed "
            "seeded ciphertext, the one encoding this federation accepts"
        )
    if reserved != 0:
        raise MalformedPayloadError(f"ciphertext {i} sets the reserved bytes of its header")
    if size != len(chunk):
        raise MalformedPayloadError(
            f"ciphertext {i} declares {size} bytes, holds {len(chunk)} (cut or trailing bytes)"
        )
