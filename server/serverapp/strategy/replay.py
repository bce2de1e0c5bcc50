"""The ciphertexts the server has accepted, by their replay keys: a replay is refused.

A codec keys every upload by its parsed ciphertexts
(:meth:`~sepals.common.codec.UpdateCodec.validate_upload`); the strategy refuses an upload
any of whose keys it accepted before, in this round or an earlier one, and the checkpoint
keeps the keys across restarts. A 1M-parameter BFV upload has 124 keys (two per
ciphertext), so they are held as one sorted array of 64-bit words: 8 bytes a key.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from sepals.common.codec import REPLAY_KEY_BYTES


class ReplayKeys:
    """A set of 64-bit replay keys, as a sorted ``uint64`` array.

    Args:
        keys: The keys to start with.

    """

    def __init__(self, keys: Iterable[int] = ()) -> None:
        self._keys = np.unique(np.fromiter(keys, dtype=np.uint64))

    def __len__(self) -> int:
        return int(self._keys.size)

    def __iter__(self) -> Iterator[int]:
        return iter(int(k) for k in self._keys)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReplayKeys) and np.array_equal(self._keys, other._keys)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def any_of(self, keys: Sequence[int]) -> bool:
        """Whether any of ``keys`` is in the set."""
        if not keys or not self._keys.size:
            return False
        probe = np.asarray(keys, dtype=np.uint64)
        at = np.minimum(np.searchsorted(self._keys, probe), self._keys.size - 1)
        return bool(np.any(self._keys[at] == probe))

    def copy(self) -> ReplayKeys:
        """An independent copy."""
        out = ReplayKeys()
        out._keys = self._keys.copy()
        return out

    def add(self, keys: Iterable[int]) -> None:
        """Add ``keys`` (one merge of sorted arrays per call: call once per round)."""
        new = keys._keys if isinstance(keys, ReplayKeys) else np.fromiter(keys, dtype=np.uint64)
        if new.size:
            self._keys = np.union1d(self._keys, new)

    def to_bytes(self) -> bytes:
        """The keys, ascending, as little-endian 8-byte words (for the checkpoint)."""
        return self._keys.astype("<u8").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> ReplayKeys:
        """Inverse of :meth:`to_bytes`.

        Raises:
            ValueError: the length is not a multiple of the key size.

        """
        if len(data) % REPLAY_KEY_BYTES:
            raise ValueError(
                f"replay keys take {REPLAY_KEY_BYTES} bytes each; got {len(data)} bytes"
            )
        keys = cls()
        keys._keys = np.unique(np.frombuffer(data, dtype="<u8").astype(np.uint64))
        return keys
