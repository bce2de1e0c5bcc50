"""What an attacker does to a BFV upload it holds: other encodings that SEAL also loads, and edits.

Every function takes a chunk in the canonical encoding (an uncompressed seeded SEAL
ciphertext, see ``sepals.common.seal_canon``) and returns bytes SEAL may well load as the
same ciphertext, or as one with a single half (c0 or the seed) changed.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import zstandard

from sepals.common.codec import pack_payload, unpack_payload
from sepals.common.seal_canon import SEAL_HEADER, SEED_BYTES

HEADER = SEAL_HEADER.size
PREFIX = 113  # header, metadata, c0's array header and word count
SEED_HEADER_FROM_END = SEED_BYTES + 1 + HEADER


def header(chunk: bytes, *, compr: int | None = None, size: int | None = None, **kw: int) -> bytes:
    """``chunk``'s SEAL header with fields replaced (``minor``, ``reserved`` by keyword)."""
    magic, hsize, major, minor, old_compr, reserved, old_size = SEAL_HEADER.unpack_from(chunk)
    return SEAL_HEADER.pack(
        magic,
        hsize,
        kw.get("major", major),
        kw.get("minor", minor),
        old_compr if compr is None else compr,
        kw.get("reserved", reserved),
        old_size if size is None else size,
    )


def compressed(chunk: bytes, mode: str, level: int = 3, trailing: bytes = b"") -> bytes:
    """The same ciphertext, its body compressed as SEAL would read it (plus ``trailing``)."""
    body = chunk[HEADER:]
    if mode == "zlib":
        packed, compr = zlib.compress(body, level), 1
    elif mode == "zstd":
        packed, compr = zstandard.ZstdCompressor(level=level).compress(body), 2
    else:
        packed, compr = body, 0
    packed += trailing
    return header(chunk, compr=compr, size=HEADER + len(packed)) + packed


def padded(chunk: bytes, extra: bytes, *, declared: bool) -> bytes:
    """``chunk`` with bytes after it, counted in its declared size or not."""
    size = len(chunk) + len(extra) if declared else len(chunk)
    return header(chunk, size=size) + chunk[HEADER:] + extra


def edited(chunk: bytes, offset: int, data: bytes) -> bytes:
    """``chunk`` with ``data`` written at ``offset`` (negative: from the end)."""
    at = offset % len(chunk)
    return chunk[:at] + data + chunk[at + len(data) :]


def bump_c0(chunk: bytes, word: int = 0) -> bytes:
    """c0's coefficient ``word`` moved by one (still below any prime): a plaintext shift."""
    at = PREFIX + 8 * word
    (value,) = struct.unpack_from("<Q", chunk, at)
    return edited(chunk, at, struct.pack("<Q", value + 1 if value < 2**40 else value - 1))


def flip_seed(chunk: bytes, byte: int = 0) -> bytes:
    """One bit of the seed flipped: c1 becomes another uniform polynomial."""
    at = len(chunk) - SEED_BYTES + byte
    return edited(chunk, at, bytes([chunk[at] ^ 1]))


def unseeded(server: Any, chunk: bytes, *, uncompressed: bool) -> bytes:
    """The same ciphertext with c1 written out in full, as SEAL saves a loaded one."""
    import tenseal.sealapi as seal

    ct = seal.Ciphertext()
    server._files.load(chunk, lambda p: ct.load(server._ctx, p))
    blob: bytes = server._files.dump(ct)
    if not uncompressed:
        return blob
    body = zstandard.ZstdDecompressor().decompress(blob[HEADER:], max_output_size=2**24)
    return header(blob, compr=0, size=HEADER + len(body)) + body


def variants(server: Any, chunk: bytes) -> dict[str, bytes]:
    """Every re-encoding and one-half edit of ``chunk`` the attacker tries."""
    return {
        "zstd (as SEAL saves it)": compressed(chunk, "zstd"),
        "zstd level 1": compressed(chunk, "zstd", 1),
        "zstd level 19": compressed(chunk, "zstd", 19),
        "zstd, trailing bytes": compressed(chunk, "zstd", trailing=b"\x00tail"),
        "zlib": compressed(chunk, "zlib"),
        "zlib, trailing bytes": compressed(chunk, "zlib", 9, trailing=b"tail"),
        "trailing bytes, declared": padded(chunk, b"\x00" * 8, declared=True),
        "trailing bytes, undeclared": padded(chunk, b"\x00" * 8, declared=False),
        "reserved header bytes": header(chunk, reserved=0x0101) + chunk[HEADER:],
        "reserved bytes of c0's header": edited(chunk, 16 + 73 + 6, b"\x01"),
        "reserved bytes of the seed's header": edited(chunk, -SEED_HEADER_FROM_END + 6, b"\x01"),
        "another SEAL version": header(chunk, minor=0) + chunk[HEADER:],
        "PRNG type shake256": edited(chunk, -SEED_BYTES - 1, b"\x02"),
        "unseeded, uncompressed": unseeded(server, chunk, uncompressed=True),
        "unseeded, as SEAL saves it": unseeded(server, chunk, uncompressed=False),
        "byte for byte": chunk,
        "c0 moved by one": bump_c0(chunk),
        "seed changed": flip_seed(chunk),
    }


def with_chunks(payload: bytes, chunks: list[bytes]) -> bytes:
    """``payload``'s envelope around other chunks."""
    head, _ = unpack_payload(payload)
    return pack_payload(head.codec_id, head.fingerprint, head.length, chunks)


def chunks_of(payload: bytes) -> list[bytes]:
    """The chunks of a payload."""
    return unpack_payload(payload)[1]
