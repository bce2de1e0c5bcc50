"""Checks on the plaintext metadata of client replies, and safe text for the logs.

Everything a client sends is untrusted: a reply may carry infinities, NaN, negative or
huge counts, floats where integers belong, wrong types, or text meant to mislead a log
reader. The parsers here turn a reply's metric record into typed values that are
finite and in range, or raise :class:`ReplyRejected` whose ``reason`` names the field
and the rule it breaks, never the offending value. :func:`sanitize_text` makes any
other untrusted text (a client's error reason, an exception message) safe to log and
store: printable characters only, at most :data:`MAX_REASON_CHARS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from sepals.common.config import ACCOUNTANTS
from sepals.common.errors import SepalsError

MAX_REASON_CHARS = 200
# Sane upper bounds of a client's DP-SGD step count and of the rounds it took part in.
MAX_STEPS = 10**9
MAX_ROUNDS = 10**6
#: Most values an update can hold (the largest model a plan may name is far below it).
MAX_CLAMPED = 10**12
# Train-reply metrics the server reads (the others it checks and drops).
TIMING_KEYS = ("train-seconds", "decrypt-seconds", "encrypt-seconds")


class ReplyRejected(SepalsError):
    """A reply is excluded; ``reason`` is vetted text, safe to log and to store."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sanitize_text(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` as one printable line of at most ``limit`` characters.

    Control, format and separator characters (newlines, ANSI escapes, bidi overrides)
    become ``?``; longer text is cut and ends in ``...``.
    """
    try:
        raw = text if isinstance(text, str) else str(text)
    except Exception:
        return "(unprintable)"
    clipped = raw[: limit + 1]
    clean = "".join(ch if ch.isprintable() else "?" for ch in clipped)
    if len(clean) > limit:
        clean = clean[: max(0, limit - 3)] + "..."
    return clean


@dataclass(frozen=True)
class Interval:
    """A range of allowed values, each end open or closed."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below

    def __str__(self) -> str:
        left = "(" if self.lo_open else "["
        right = ")" if self.hi_open else "]"
        return f"{left}{self.lo:g}, {self.hi:g}{right}"


NON_NEGATIVE = Interval(0.0, math.inf, hi_open=True)
PROBABILITY = Interval(0.0, 1.0)
DELTA = Interval(0.0, 1.0, lo_open=True, hi_open=True)
SAMPLE_RATE = Interval(0.0, 1.0, lo_open=True)
FINITE = Interval(-math.inf, math.inf, lo_open=True, hi_open=True)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def get_int(metrics: Mapping[str, object], key: str, lo: int, hi: int) -> int | None:
    """``metrics[key]`` if it is an ``int`` in ``[lo, hi]``; ``None`` if absent.

    Raises:
        ReplyRejected: present but a float, a bool, another type, or out of range.

    """
    if key not in metrics:
        return None
    value = metrics[key]
    if not _is_int(value) or not lo <= value <= hi:  # type: ignore[operator]
        raise ReplyRejected(f"{key} must be an integer in [{lo}, {hi}]")
    return int(value)  # type: ignore[call-overload]


def get_float(metrics: Mapping[str, object], key: str, allowed: Interval) -> float | None:
    """``metrics[key]`` as a finite float in ``allowed``; ``None`` if absent.

    Raises:
        ReplyRejected: present but not a finite number in range (bools refused).

    """
    if key not in metrics:
        return None
    value = metrics[key]
    number = math.nan
    if (_is_int(value) or isinstance(value, float)) and not isinstance(value, bool):
        try:
            number = float(value)  # type: ignore[arg-type]
        except OverflowError:
            number = math.nan
    if not math.isfinite(number) or number not in allowed:
        raise ReplyRejected(f"{key} must be a finite number in {allowed}")
    return number


def get_count(metrics: Mapping[str, object], cap: int) -> int:
    """``num-examples``: required, an ``int`` in ``[1, cap]``."""
    n = get_int(metrics, "num-examples", 1, cap)
    if n is None:
        raise ReplyRejected(f"num-examples must be an integer in [1, {cap}]")
    return n


@dataclass(frozen=True)
class TrainMetrics:
    """The checked metrics of one train reply."""

    num_examples: int
    epsilon: float | None
    epsilon_replace_one: float | None
    delta: float | None
    noise_multiplier: float | None
    sample_rate: float | None
    total_steps: int
    rounds_participated: int
    quant_error: float | None
    clamped_values: int = 0


def parse_train_metrics(
    metrics: Mapping[str, object], cap: int, quant_step: float | None = None
) -> TrainMetrics:
    """Check a train reply's metrics.

    Args:
        metrics: The reply's ``metrics`` record.
        cap: Most examples this client may report.
        quant_step: The codec's quantization step; a reported rounding error above it
            is refused (``None``: no such bound).

    Raises:
        ReplyRejected: a field is missing, of the wrong type, not finite or out of range.

    """
    n = get_count(metrics, cap)
    quant = Interval(0.0, quant_step) if quant_step is not None else NON_NEGATIVE
    get_int(metrics, "steps", 0, MAX_STEPS)
    for key in TIMING_KEYS:
        get_float(metrics, key, NON_NEGATIVE)
    return TrainMetrics(
        num_examples=n,
        epsilon=get_float(metrics, "epsilon", NON_NEGATIVE),
        epsilon_replace_one=get_float(metrics, "epsilon-replace-one", NON_NEGATIVE),
        delta=get_float(metrics, "delta", DELTA),
        noise_multiplier=get_float(metrics, "noise-multiplier", NON_NEGATIVE),
        sample_rate=get_float(metrics, "sample-rate", SAMPLE_RATE),
        total_steps=get_int(metrics, "total-steps", 0, MAX_STEPS) or 0,
        rounds_participated=get_int(metrics, "rounds-participated", 0, MAX_ROUNDS) or 0,
        quant_error=get_float(metrics, "quant-error", quant),
        clamped_values=get_int(metrics, "clamped-values", 0, MAX_CLAMPED) or 0,
    )


@dataclass(frozen=True)
class EvalMetrics:
    """The checked metrics of one evaluate reply."""

    num_examples: int
    loss: float
    accuracy: float | None
    metric: float | None = None


def parse_eval_metrics(metrics: Mapping[str, object], cap: int) -> EvalMetrics:
    """Check an evaluate reply's metrics.

    ``num-examples`` must be an ``int`` in ``[1, cap]``, ``loss`` a finite number
    ``>= 0`` and ``accuracy`` a finite number in ``[0, 1]``; a client whose app has its
    own metric sends ``metric`` (any finite number) instead of ``accuracy``.

    Raises:
        ReplyRejected: a field is missing, of the wrong type, not finite or out of range.

    """
    n = get_count(metrics, cap)
    loss = get_float(metrics, "loss", NON_NEGATIVE)
    accuracy = get_float(metrics, "accuracy", PROBABILITY)
    metric = get_float(metrics, "metric", FINITE)
    if loss is None:
        raise ReplyRejected(f"loss must be a finite number in {NON_NEGATIVE}")
    if accuracy is None and metric is None:
        raise ReplyRejected(f"accuracy must be a finite number in {PROBABILITY}")
    return EvalMetrics(num_examples=n, loss=loss, accuracy=accuracy, metric=metric)


def parse_accountant(value: object) -> str | None:
    """The accountant a client names (``None`` if it names none).

    Raises:
        ReplyRejected: it names no accountant of :data:`~sepals.common.config.ACCOUNTANTS`.

    """
    if value is None:
        return None
    if not isinstance(value, str) or value not in ACCOUNTANTS:
        raise ReplyRejected(f"accountant must be one of {', '.join(ACCOUNTANTS)}")
    return value
