"""What the public front allows one connection, one address and everyone together.

:class:`FrontLimits` holds the deadlines and sizes (``[front]`` in ``server.toml``);
:class:`Admission` counts the connections and the buffered body bytes held per client
address and in total; :class:`Lineup` picks the connection to drop when the front is
full; :class:`RefusalLog` writes one line per kind of refusal (at most one a second per
kind, with a count), never a byte of the request; :func:`give_back_memory` returns
what closed connections freed to the system.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields
from logging import WARNING

from sepals.common.log import log

MIB = 1024 * 1024
# Flower chunks arrays into 5 MiB objects; leave room for protobuf framing.
MAX_BODY_BYTES = 16 * MIB
# Longest deadline accepted (seconds): a day. A front that waits longer is not defended.
MAX_DEADLINE = 24 * 3600.0
# Seconds an upload may sit idle before it may be dropped to make room for another.
GRACE = 1.0


@dataclass(frozen=True)
class FrontLimits:
    """Deadlines and sizes the public front enforces (``[front]`` in ``server.toml``).

    Attributes:
        header_timeout: Seconds from a connection's accept (TLS handshake included) to
            the end of its first request's head; for a later request on a kept-alive
            connection, from that request's first byte.
        idle_timeout: Longest pause, in seconds, while a body arrives or a response is
            written, and longest wait for the next request on a kept-alive connection.
        body_timeout: Seconds a whole request body may take to arrive.
        max_header_bytes: Largest request head (request line and header fields).
        max_headers: Most header fields in one request.
        max_body_bytes: Largest request body (``413`` above it).
        max_connections: Connections held at once, all addresses together.
        max_connections_per_address: Connections held at once from one client address
            (an IPv6 client is counted by its /64 network).
        max_buffered_bytes: Request body bytes held in memory at once, all
            connections together; a body's bytes count from their arrival until its
            response ends.
        max_buffered_bytes_per_address: The same, per client address.

    """

    header_timeout: float = 10.0
    idle_timeout: float = 15.0
    body_timeout: float = 120.0
    max_header_bytes: int = 16 * 1024
    max_headers: int = 64
    max_body_bytes: int = MAX_BODY_BYTES
    max_connections: int = 512
    max_connections_per_address: int = 16
    max_buffered_bytes: int = 256 * MIB
    max_buffered_bytes_per_address: int = 64 * MIB

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float":
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{f.name} must be a number of seconds, got {value!r}")
                if not (math.isfinite(value) and 0 < value <= MAX_DEADLINE):
                    raise ValueError(f"{f.name} must be in (0, {MAX_DEADLINE:g}] s, got {value}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be >= 1024, got {self.max_header_bytes}")
        pairs = (
            ("max_connections_per_address", "max_connections"),
            ("max_body_bytes", "max_buffered_bytes_per_address"),
            ("max_buffered_bytes_per_address", "max_buffered_bytes"),
        )
        for small, large in pairs:
            if getattr(self, small) > getattr(self, large):
                raise ValueError(
                    f"{small} ({getattr(self, small)}) must not exceed {large} "
                    f"({getattr(self, large)})"
                )

    def to_args(self) -> list[str]:
        """These limits as the front's command-line flags (see :meth:`add_arguments`)."""
        out: list[str] = []
        for f in fields(self):
            out += [_flag(f.name), repr(getattr(self, f.name))]
        return out

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per limit, ``--header-timeout`` etc., defaulting to the default."""
        for f in fields(cls):
            kind = float if f.type == "float" else int
            parser.add_argument(_flag(f.name), type=kind, default=f.default, help=argparse.SUPPRESS)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FrontLimits:
        """The limits parsed by the flags of :meth:`add_arguments`."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def address_key(host: str) -> str:
    """Whom a connection is counted against: its IPv4 address, or its IPv6 /64.

    One IPv6 host usually holds a whole /64, so counting single IPv6 addresses would
    give it billions of allowances. IPv4-mapped IPv6 addresses count as IPv4.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Admission:
    """Connections and buffered bytes held, per address and in total, against the limits.

    Args:
        limits: The limits to hold them to.

    """

    def __init__(self, limits: FrontLimits) -> None:
        self.limits = limits
        self.connections = 0
        self.buffered = 0
        self._connections: dict[str, int] = {}
        self._buffered: dict[str, int] = {}

    def open(self, key: str) -> str | None:
        """Count a new connection from ``key``; the reason it is refused, else ``None``."""
        held = self._connections.get(key, 0)
        if held >= self.limits.max_connections_per_address:
            return f"per-address connection limit ({self.limits.max_connections_per_address})"
        if self.connections >= self.limits.max_connections:
            return f"connection limit ({self.limits.max_connections}) reached"
        self._connections[key] = held + 1
        self.connections += 1
        return None

    def held(self, key: str) -> int:
        """Connections held by ``key``."""
        return self._connections.get(key, 0)

    def buffered_by(self, key: str) -> int:
        """Body bytes held by ``key``."""
        return self._buffered.get(key, 0)

    def full(self, key: str) -> bool:
        """Whether only the total, not ``key``'s own limit, stands in a connection's way."""
        return (
            self.connections >= self.limits.max_connections
            and self._connections.get(key, 0) < self.limits.max_connections_per_address
        )

    def close(self, key: str) -> None:
        """Uncount a connection counted by :meth:`open`."""
        self.connections -= 1
        _decrement(self._connections, key, 1)

    def reserve(self, key: str, size: int) -> str | None:
        """Count ``size`` body bytes for ``key``; the reason it is refused, else ``None``."""
        held = self._buffered.get(key, 0)
        if held + size > self.limits.max_buffered_bytes_per_address:
            return "per-address buffered-body limit reached"
        if self.buffered + size > self.limits.max_buffered_bytes:
            return "buffered-body limit reached"
        self._buffered[key] = held + size
        self.buffered += size
        return None

    def room(self, size: int) -> bool:
        """Whether ``size`` more body bytes fit within the total."""
        return self.buffered + size <= self.limits.max_buffered_bytes

    def release(self, key: str, size: int) -> None:
        """Uncount bytes counted by :meth:`reserve`."""
        self.buffered -= size
        _decrement(self._buffered, key, size)


def _decrement(table: dict[str, int], key: str, amount: int) -> None:
    left = table.get(key, 0) - amount
    if left > 0:
        table[key] = left
    else:
        table.pop(key, None)  # an address that holds nothing costs no memory


class Lineup:
    """Connections that may be dropped to make room, and which one goes first.

    When the front is full, a newcomer may take the place of a connection from an
    address that holds more than the newcomer's would (so many attacking addresses
    cannot crowd out one that holds little), and of that address's connections the
    one least recently active (an honest client's connection is busy for milliseconds;
    a slow-connection attacker's idles for as long as it can make it). An upload is
    dropped only once it has been idle for :data:`GRACE` seconds, so that one still
    arriving is not cut short.
    """

    def __init__(self) -> None:
        self._lines: dict[str, OrderedDict[int, tuple[float, Callable[[], None]]]] = {}
        self._keys: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def touch(self, ident: int, key: str, drop: Callable[[], None]) -> None:
        """Put ``ident`` (from address ``key``) last in line; ``drop()`` ends it if picked."""
        line = self._lines.setdefault(key, OrderedDict())
        line[ident] = (time.monotonic(), drop)
        line.move_to_end(ident)
        self._keys[ident] = key

    def leave(self, ident: int) -> None:
        """Take ``ident`` out of the line."""
        key = self._keys.pop(ident, None)
        if key is not None:
            line = self._lines[key]
            line.pop(ident, None)
            if not line:
                del self._lines[key]

    def drop_for(
        self, key: str, held: Callable[[str], int], need: int, grace: float = GRACE
    ) -> bool:
        """Make room for ``need`` more of what ``held(address)`` counts, asked by ``key``.

        Drops the stalest connection idle for ``grace`` s of the address holding most,
        if it holds more than ``held(key) + need``.

        Returns:
            Whether one was dropped.

        """
        floor = held(key) + need
        idle_since = time.monotonic() - grace
        for other in sorted(self._lines, key=held, reverse=True):
            if held(other) <= floor:
                return False
            ident, (since, drop) = next(iter(self._lines[other].items()))
            if since <= idle_since:
                self.leave(ident)
                drop()
                return True
        return False


class RefusalLog:
    """One warning line per kind of refusal, at most one a second per kind.

    A flood of refusals must not become a flood of log lines, so each line counts the
    refusals of its kind since the previous line of that kind.

    Args:
        interval: Seconds between two lines of one kind.

    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.counts: dict[str, int] = {}
        self._pending: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def note(self, reason: str, key: str) -> None:
        """Record that a connection from ``key`` was refused or closed for ``reason``."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        pending = self._pending.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last.get(reason, -math.inf) < self.interval:
            self._pending[reason] = pending
            return
        self._last[reason] = now
        self._pending[reason] = 0
        log(WARNING, "front refused %s: %s (%d such since the last line)", key, reason, pending)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim with
    return trim


def give_back_memory() -> None:
    """Free what only reference cycles hold, then return the C heap's free pages.

    A closed TLS connection's objects (asyncio's transport and protocol, with a 256 KiB
    read buffer) sit in reference cycles that only the garbage collector frees, and
    body pieces of up to 256 KiB come from glibc's heaps, which keep freed pages unless
    trimmed (glibc ``malloc_trim``): without both, the front's resident memory would
    stay at its peak after an attack.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
