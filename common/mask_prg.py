"""The masks' PRG: AES-CTR keystream onto ``[0, t)``, and signed sums of mask vectors.

A mask vector is the AES-CTR keystream (``cryptography``; AES-128 or AES-256 by the seed's
size, counter from zero) read as little-endian 64-bit words, each cut to the bit length
of ``t`` and kept only if below ``t`` (rejection sampling: exactly uniform; a rejected
word is replaced, in order, by the next accepted words after the first ``length``).
Nothing here uses numpy's generators.

Sums of many vectors (a client's total mask, the server's offset) are expanded chunk by
chunk into one vector of residues, each chunk added while it is still in cache. The
server, which expands hundreds of vectors of a large model per round, can ask for two
accelerations that change only speed, never a bit of the result:

* ``fused``: check, reduce and add a chunk in one compiled pass
  (:mod:`sepals.common.mask_fold`, numba) instead of five numpy passes;
* ``workers``: threads that each sum a share of the terms; AES-CTR and the fused pass
  release the GIL, so they run on separate cores. The partial sums are added at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32  # the longest mask seed mask_vector takes (an AES-256 key)
SECRET_BYTES = 16  # a shared secret (self-mask seed, mask-key seed) and a pair seed: AES-128

SlotVector = npt.NDArray[np.uint64]

#: Keystream words expanded at a time: 1 MiB, so that masking, checking and adding a
#: chunk find it still in cache.
CHUNK_WORDS = 1 << 17

#: ``fold(acc, words, keep, limit, negate) -> any rejected``: see :mod:`sepals.common.mask_fold`.
_Fold = Callable[[SlotVector, SlotVector, np.uint64, np.uint64, bool], bool]


class _Expander:
    """Adds PRG vectors modulo ``t`` into an accumulator chunk by chunk, reusing one buffer."""

    def __init__(self, chunk: int = CHUNK_WORDS, *, fused: bool = False) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 word, got {chunk}")
        self._chunk = chunk
        self._zeros = bytes(8 * chunk)
        # update_into wants room for one block more than it writes.
        self._buf = np.empty(chunk + 2, dtype="<u8")
        self._fold: _Fold | None = None
        if fused:
            # Imported only here: numba takes about 0.3 s to load and compiles the pass
            # once per machine (cached on disk), which a client, whose mask needs the
            # numpy path only, should not pay.
            from sepals.common.mask_fold import fold

            self._fold = fold

    def add(self, acc: SlotVector, seed: bytes, modulus: int, *, negate: bool = False) -> None:
        """``acc = (acc +- mask_vector(seed, len(acc), modulus)) mod modulus`` in place.

        ``acc`` holds residues below ``modulus``; so does it after.
        """
        check_prg_input(seed, modulus)
        length = acc.size
        keep = np.uint64((1 << modulus.bit_length()) - 1)
        limit = np.uint64(modulus)
        stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        out = self._buf.data.cast("B")
        rejected: list[npt.NDArray[np.intp]] = []
        for start in range(0, length, self._chunk):
            size = min(self._chunk, length - start)
            stream.update_into(memoryview(self._zeros)[: 8 * size], out)
            words = self._buf[:size]
            if self._fold is not None:
                # Rejected words add nothing here; their positions are found only in the
                # rare chunk that has one.
                if self._fold(acc[start : start + size], words, keep, limit, negate):
                    rejected.append(np.flatnonzero((words & keep) >= limit) + start)
                continue
            words &= keep
            if int(words.max()) >= modulus:
                bad = np.flatnonzero(words >= limit)
                words[bad] = 0  # filled in below, from the stream after the first length
                rejected.append(bad + start)
            _accumulate(acc[start : start + size], words, limit, negate)
        if not rejected:
            return
        # Each rejected word is replaced, in order, by the next accepted words after the
        # first ``length``.
        bad = np.concatenate(rejected)
        filled = 0
        while filled < bad.size:
            need = bad.size - filled
            fresh = np.frombuffer(stream.update(bytes(8 * (need + 8))), dtype="<u8") & keep
            good = fresh[fresh < limit]
            take = min(good.size, need)
            at = bad[filled : filled + take]
            part = acc[at]
            _accumulate(part, good[:take].copy(), limit, negate)
            acc[at] = part
            filled += take


def _accumulate(acc: SlotVector, words: SlotVector, limit: np.uint64, negate: bool) -> None:
    """``acc = (acc +- words) mod limit`` for residues below ``limit``; ``words`` is clobbered."""
    if negate:
        np.subtract(limit, words, out=words)  # in [1, limit]: adding it subtracts the word
    acc += words  # below 2 * limit < 2**63
    # acc - limit wraps above acc exactly when acc < limit: the minimum is the residue.
    np.subtract(acc, limit, out=words)
    np.minimum(acc, words, out=acc)


def check_prg_input(seed: bytes, modulus: int) -> None:
    """Raise ``ValueError`` unless ``seed`` is a 16- or 32-byte key and ``2 <= modulus < 2^62``."""
    if len(seed) not in (SECRET_BYTES, SEED_BYTES):
        raise ValueError(f"a mask seed has {SECRET_BYTES} or {SEED_BYTES} bytes, got {len(seed)}")
    if not 2 <= modulus < 2**62:
        raise ValueError(f"modulus must lie in [2, 2^62), got {modulus}")


def mask_vector(seed: bytes, length: int, modulus: int, *, chunk: int = CHUNK_WORDS) -> SlotVector:
    """``length`` values uniform on ``[0, modulus)``, expanded from a 16- or 32-byte seed.

    See the module docstring for the construction. Deterministic: the same seed gives the
    same vector on every party. ``chunk`` (words expanded at a time) changes only speed.
    """
    check_prg_input(seed, modulus)
    out = np.zeros(length, dtype=np.uint64)
    _Expander(min(chunk, max(length, 1))).add(out, seed, modulus)
    return out


class MaskSum:
    """Accumulates ``sum(sign * mask_vector(seed)) mod modulus`` one term at a time.

    Each term is expanded, reduced and added chunk by chunk into one vector of residues
    (the chunk still in cache); no vector is allocated per term. ``fused`` selects the
    compiled pass (same result).
    """

    def __init__(
        self, length: int, modulus: int, *, chunk: int = CHUNK_WORDS, fused: bool = False
    ) -> None:
        self.length, self.modulus = length, modulus
        self._sum = np.zeros(length, dtype=np.uint64)
        self._expander = _Expander(min(chunk, max(length, 1)), fused=fused)

    def add(self, sign: int, seed: bytes) -> None:
        """Add (``sign > 0``) or subtract the mask expanded from ``seed``."""
        self._expander.add(self._sum, seed, self.modulus, negate=sign < 0)

    def value(self) -> SlotVector:
        """The sum so far, as residues below the modulus."""
        return self._sum.copy()


def signed_mask_sum(
    terms: Sequence[tuple[int, bytes]],
    length: int,
    modulus: int,
    *,
    workers: int = 1,
    fused: bool = False,
) -> SlotVector:
    """``sum(sign * mask_vector(seed)) mod modulus`` over ``(sign, seed)`` terms.

    ``workers`` threads each sum every ``workers``-th term into a vector of their own
    (``workers`` extra vectors of memory); ``fused`` selects the compiled pass. Neither
    changes the result.

    Raises:
        ValueError: ``workers`` below 1, or a seed or modulus :func:`mask_vector` refuses.

    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for _, seed in terms:
        check_prg_input(seed, modulus)

    def partial(share: Sequence[tuple[int, bytes]]) -> SlotVector:
        total = MaskSum(length, modulus, fused=fused)
        for sign, seed in share:
            total.add(sign, seed)
        return total.value()

    workers = min(workers, len(terms))
    if workers <= 1:
        return partial(terms)
    with ThreadPoolExecutor(workers, thread_name_prefix="sepals-mask") as pool:
        sums = list(pool.map(partial, [terms[i::workers] for i in range(workers)]))
    total = sums[0]
    for other in sums[1:]:
        add_mod(total, other, modulus)
    return total


def mask_threads() -> int:
    """Threads worth giving :func:`signed_mask_sum` here: the usable cores, at most 4."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, usable or 1))


def add_mod(acc: SlotVector, values: SlotVector, modulus: int) -> None:
    """``acc = (acc + values) mod modulus`` in place; both hold residues below ``modulus``."""
    acc += values
    acc[acc >= modulus] -= np.uint64(modulus)


def sub_mod(acc: SlotVector, values: SlotVector, modulus: int) -> None:
    """``acc = (acc - values) mod modulus`` in place; both hold residues below ``modulus``."""
    add_mod(acc, np.uint64(modulus) - values, modulus)
    # ``modulus - 0 == modulus`` is not a residue; adding it is a no-op modulo t, and
    # add_mod has already brought the sum back below the modulus.
