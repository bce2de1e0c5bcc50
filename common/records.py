"""Flower ``ArrayRecord`` s that carry sepals payloads (encoded updates and global models).

A payload is opaque bytes in one ``Array`` of stype :data:`PAYLOAD_STYPE`; the ``global``
record holds the encrypted weighted sum and its plaintext weight total. The round plan
signs a digest of that record, so these helpers sit below both the protocol and the plan.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord

KEY_PAYLOAD = "payload"
KEY_WEIGHT_TOTAL = "weight-total"
KEY_SUMMANDS = "summands"
PAYLOAD_STYPE = "sepals.payload.v1"
PAYLOAD_DTYPE = "bytes"


def payload_array(payload: bytes) -> Any:
    """Wrap payload bytes in a Flower ``Array`` (chunked by Flower when large)."""
    return Array(dtype=PAYLOAD_DTYPE, shape=(len(payload),), stype=PAYLOAD_STYPE, data=payload)


def payload_from_array(array: Any) -> bytes:
    """The payload bytes inside an ``Array`` made by :func:`payload_array`.

    Raises:
        ValueError: the array is not a sepals payload.

    """
    if getattr(array, "stype", None) != PAYLOAD_STYPE:
        raise ValueError(
            f"array has stype {getattr(array, 'stype', None)!r}, expected {PAYLOAD_STYPE!r}"
        )
    return bytes(array.data)


class GlobalModel(NamedTuple):
    """A global model as a client receives it.

    Attributes:
        payload: The encrypted sum of the weighted updates.
        weight_total: The sum of their weights (plaintext).
        summands: How many updates the sum holds (``None``: not said; a client then
            bounds the sum by ``max_clients`` updates).

    """

    payload: bytes
    weight_total: float
    summands: int | None = None


def global_record(payload: bytes, weight_total: float, summands: int | None = None) -> Any:
    """The ``global`` ArrayRecord: encrypted weighted sum, its weight total and count."""
    arrays = {
        KEY_PAYLOAD: payload_array(payload),
        KEY_WEIGHT_TOTAL: Array(np.array([weight_total], dtype=np.float64)),
    }
    if summands is not None:
        arrays[KEY_SUMMANDS] = Array(np.array([summands], dtype=np.int64))
    return ArrayRecord(arrays)


def read_global_model(record: Any) -> GlobalModel | None:
    """The :class:`GlobalModel` of a ``global`` record, or ``None`` if it is empty.

    Raises:
        ValueError: the record is malformed.

    """
    parsed = read_global_record(record)
    if parsed is None:
        return None
    summands = None
    if KEY_SUMMANDS in record:
        raw = record[KEY_SUMMANDS].numpy().reshape(-1)
        if raw.size != 1 or raw.dtype.kind != "i" or int(raw[0]) < 1:
            raise ValueError("global record's summands must be one integer >= 1")
        summands = int(raw[0])
    return GlobalModel(parsed[0], parsed[1], summands)


def read_global_record(record: Any) -> tuple[bytes, float] | None:
    """``(payload, weight_total)`` of a ``global`` record, or ``None`` if it is empty.

    Raises:
        ValueError: the record is malformed.

    """
    if record is None or len(record) == 0:
        return None
    if KEY_PAYLOAD not in record or KEY_WEIGHT_TOTAL not in record:
        raise ValueError("global record must hold 'payload' and 'weight-total'")
    weight_total = float(record[KEY_WEIGHT_TOTAL].numpy().reshape(-1)[0])
    if not (np.isfinite(weight_total) and weight_total > 0):
        raise ValueError(f"global weight total must be positive, got {weight_total}")
    return payload_from_array(record[KEY_PAYLOAD]), weight_total
