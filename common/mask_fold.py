"""One compiled pass that checks, reduces and adds a chunk of PRG words (numba).

:func:`fold` does what :class:`sepals.common.mask_prg._Expander`'s numpy path does with
five passes over a chunk (cut to the bit length, find rejected words, negate, add, reduce)
in one, without the GIL. It is compiled on first use and cached on disk (numba's
``cache=True``: next to this file, or in the user's cache directory where that is not
writable). Importing this module loads numba but compiles nothing.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def fold(
    acc: np.ndarray,  # type: ignore[type-arg]
    words: np.ndarray,  # type: ignore[type-arg]
    keep: np.uint64,
    limit: np.uint64,
    negate: bool,
) -> bool:
    """``acc = (acc +- (words & keep)) mod limit`` in place, a rejected word adding nothing.

    ``acc`` holds residues below ``limit`` (uint64), ``words`` raw keystream words of the
    same length; a word is rejected when ``words & keep >= limit``. Returns whether any
    was (their positions are then ``(words & keep) >= limit``; ``words`` is not changed).
    """
    rejected = False
    zero = np.uint64(0)
    for i in range(words.size):
        w = words[i] & keep
        bad = w >= limit
        rejected |= bad
        w = zero if bad else w
        if negate:
            w = limit - w  # in [1, limit]: adding it subtracts the word (limit adds 0)
        s = acc[i] + w  # below 2 * limit < 2**63
        acc[i] = s - limit if s >= limit else s
    return rejected
