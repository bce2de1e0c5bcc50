"""Admission of one phase's replies: who may reply, once, and what an admitted reply holds.

Every reply is checked before anything of it is used; the helpers here turn a reply's
Flower error or a failed check into one short reason for the round's record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from sepals.common.codec import UpdateCodec
from sepals.common.config import EncryptionConfig
from sepals.common.errors import SepalsError
from sepals.server.serverapp.replies import (
    ReplyRejected,
    sanitize_text,
)
from sepals.server.serverapp.roster import RosterError
from sepals.server.serverapp.strategy.rounds import (
    ClientRoundReport,
)


def codec_config(codec: UpdateCodec) -> EncryptionConfig | None:
    """The codec's encryption config, or ``None`` for the plain codec."""
    config = codec.encryption
    return config if config is not None and config.scheme != "none" else None


def codec_max_clients(codec: UpdateCodec) -> int | None:
    """Most updates ``codec`` may add into one aggregate (``None``: the plain codec)."""
    config = codec_config(codec)
    return None if config is None else config.max_clients


def codec_quant_step(codec: UpdateCodec) -> float | None:
    """The BFV quantization step of the codec (``None`` unless it is BFV)."""
    config = codec_config(codec)
    return config.quant_step if config is not None and config.scheme == "bfv" else None


def src_node(msg: Message) -> int:
    """The node a reply says it comes from (-1 when that is not an int)."""
    try:
        node = msg.metadata.src_node_id
        return node if isinstance(node, int) and not isinstance(node, bool) else -1
    except Exception:
        return -1


def error_of(msg: Message) -> tuple[int | None, str] | None:
    """``(code, sanitized reason)`` of an error reply, ``None`` for a normal reply."""
    if not msg.has_error():
        return None
    code: Any = msg.error.code
    if not isinstance(code, int) or isinstance(code, bool):
        code = None
    reason = msg.error.reason
    text = sanitize_text(reason) if reason else f"error code {code}"
    return code, text


def reason_of(exc: Exception) -> str:
    """A short, safe reason for excluding a reply whose handling raised ``exc``."""
    if isinstance(exc, ReplyRejected | RosterError):
        return sanitize_text(str(exc))
    if isinstance(exc, SepalsError):
        return sanitize_text(f"{type(exc).__name__}: {exc}")
    return "malformed reply"


def weighted_mean(values: list[float], weights: list[int]) -> float:
    """Weighted mean, kept inside ``[min(values), max(values)]`` despite rounding."""
    total = sum(weights)
    mean = sum(v * (w / total) for v, w in zip(values, weights, strict=True))
    return min(max(mean, min(values)), max(values))


@dataclass
class Intake:
    """What one phase (train or evaluate) of a round has accepted so far."""

    expected: frozenset[int] | None  # the sampled nodes, when this strategy sampled them
    nodes: set[int] = field(default_factory=set)
    names: set[str] = field(default_factory=set)
    keys: set[int] = field(default_factory=set)  # replay keys of the accepted uploads
    accepted: int = 0

    def admit_node(self, node: int) -> None:
        """Count one reply of ``node``; refuse an unsampled node or a second reply."""
        if self.expected is not None and node not in self.expected:
            raise ReplyRejected("reply from a node that was not sampled this round")
        if node in self.nodes:
            raise ReplyRejected("second reply from the same node this round")
        self.nodes.add(node)

    def check_name(self, name: str) -> None:
        """Refuse a second reply for the same client name."""
        if name in self.names:
            raise ReplyRejected("second reply for the same client this round")


@dataclass(frozen=True)
class Admitted:
    """A train reply that passed every check: its loaded ciphertexts and its report."""

    loaded: list[Any]
    nbytes: int
    replay_keys: tuple[int, ...]
    report: ClientRoundReport
