"""Slow and partial requests against the public front, in its own process: each fails.

The front runs as ``sepals-server`` runs it (``python -m sepals.server.front``, TLS) in
front of a fake SuperLink that records every request reaching it, with deadlines of a
second or two so that each attack is over in seconds. Attackers connect from
127.0.0.1 (and other 127.0.1.x addresses), the honest client from 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.front import (
    ATTACKER,
    HONEST,
    MIB,
    Attack,
    RecordingUpstream,
    Tls,
    attack,
    attack_stats,
    honest_round,
    rss_bytes,
    start_attacker,
    start_front,
    stop_process,
)
from sepals.common.procs import free_port
from sepals.server.front import FrontLimits

pytestmark = pytest.mark.slow  # a front process and a few hundred connections, ~25 s

LIMITS = FrontLimits(
    header_timeout=1.5,
    idle_timeout=1.0,
    body_timeout=3.0,
    max_body_bytes=4 * MIB,
    max_connections=400,
    max_connections_per_address=60,
    max_buffered_bytes=48 * MIB,
    max_buffered_bytes_per_address=16 * MIB,
)
ATTACK_SECONDS = 3.0


@dataclass
class Front:
    port: int
    pid: int
    tls: ssl.SSLContext
    ca: Path
    upstream: RecordingUpstream
    log: Path

    def forwarded(self, tag: str) -> list[dict[str, object]]:
        return [r for r in self.upstream.seen if r["tag"] == tag]


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("front")
    tls = Tls(tmp)
    with RecordingUpstream().running() as upstream:
        port = free_port()
        proc = start_front(port, upstream.port, LIMITS, tls, tmp / "front.log")
        try:
            yield Front(
                port, proc.pid, tls.client_context(), tmp / "ca.pem", upstream, tmp / "front.log"
            )
        finally:
            stop_process(proc)


def _with_attack(front: Front, plan: Attack, retries: int = 0) -> tuple[dict[str, Any], int]:
    """The attack (its own process), meanwhile honest rounds: (its stats, honest failures).

    ``retries``: how often an honest request that failed is sent again, as a SuperNode
    retries one.
    """
    attacker = start_attacker(front.port, front.ca, ATTACK_SECONDS, plan)
    try:
        time.sleep(0.5)  # the attack holds its connections by now
        failed = rounds = 0
        end = time.monotonic() + ATTACK_SECONDS / 2
        while time.monotonic() < end or rounds < 2:
            failed += honest_round(front.port, front.tls, HONEST, retries)
            rounds += 1
    finally:
        stats = attack_stats(attacker, ATTACK_SECONDS + 30)
    return stats, failed


async def _open(front: Front, source: str = ATTACKER, tls: bool = True) -> tuple[
    asyncio.StreamReader, asyncio.StreamWriter
]:  # fmt: skip
    return await asyncio.open_connection(
        "127.0.0.1",
        front.port,
        ssl=front.tls if tls else None,
        server_hostname="127.0.0.1" if tls else None,
        local_addr=(source, 0),
    )


async def _answer(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, float]:
    """What the front sends before it closes, and how long until it closed."""
    start = time.monotonic()
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    except (OSError, ssl.SSLError):
        pass
    return data, time.monotonic() - start


def _head(length: int | None = None, tag: str = "attack", extra: bytes = b"") -> bytes:
    framing = b"content-length: %d\r\n" % length if length is not None else b""
    return b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\nx-tag: %s\r\n%s%s\r\n" % (
        tag.encode(),
        framing,
        extra,
    )


def test_slowloris_from_one_address_leaves_others_served(front: Front) -> None:
    """300 TLS connections that never finish their head and 100 that never start TLS."""
    plan = Attack(slowloris=300, no_handshake=100, stalled=0, big_heads=0)
    stats, failed = _with_attack(front, plan)
    assert failed == 0
    # The attacker's connections were held until the head deadline, never longer...
    held = stats["held"]
    assert held and max(held) < LIMITS.header_timeout + 1.0
    assert any(h > LIMITS.header_timeout - 0.3 for h in held)
    # ...and no more than its per-address allowance of them at once (the rest were
    # refused on accept: a few ms).
    at_deadline = sum(1 for h in held if h > LIMITS.header_timeout - 0.3)
    rounds = ATTACK_SECONDS / LIMITS.header_timeout + 1
    assert at_deadline <= LIMITS.max_connections_per_address * rounds
    assert not front.forwarded("attack") and front.upstream.seen
    _logged(front, "front refused 127.0.0.1: request head not complete within 1.5 s")
    _logged(front, "front refused 127.0.0.1: per-address connection limit (60)")


def _logged(front: Front, line: str) -> None:
    """``line`` is in the front's log, which holds no request bytes and no traceback."""
    text = front.log.read_text()
    assert line in text
    assert "x-slow" not in text and "aaaa" not in text and "Traceback" not in text


def test_slowloris_from_many_addresses_cannot_fill_the_front(front: Front) -> None:
    """500 slow connections from 10 addresses, over the total: the idlest are dropped."""
    sources = tuple(f"127.0.1.{i}" for i in range(1, 11))
    plan = Attack(slowloris=400, no_handshake=100, stalled=0, big_heads=0, sources=sources)
    # Over the total, an honest connection takes an idle attacker's place; on a loaded
    # machine a request can still meet a full front for a moment, so it is retried
    # once, as a SuperNode retries a failed one. Every round still completes.
    stats, failed = _with_attack(front, plan, retries=1)
    assert failed == 0
    assert stats["held"] and max(stats["held"]) < LIMITS.header_timeout + 1.0


def test_stalled_and_cut_bodies_never_reach_the_superlink(front: Front) -> None:
    async def scenario() -> None:
        stalled = [await _open(front) for _ in range(4)]
        for _, w in stalled:  # 3 of a declared 4 MiB (12 of 16 MiB allowed), then nothing
            w.write(_head(4 * MIB) + b"\1" * (3 * MIB))
        drip_r, drip_w = await _open(front)
        drip_w.write(_head(4 * MIB) + b"\1" * 1000)
        drip_start = time.monotonic()
        cut = [await _open(front) for _ in range(3)]
        for _, w in cut:  # part of the body, then the client closes
            w.write(_head(1 * MIB) + b"\1" * (MIB // 2))
        chunked_r, chunked_w = await _open(front)
        chunked_w.write(_head(extra=b"transfer-encoding: chunked\r\n") + b"400\r\n" + b"\1" * 1024)

        async def drip() -> None:  # a byte every 0.3 s: never idle, never done
            for _ in range(30):
                await asyncio.sleep(0.3)
                if drip_w.is_closing():
                    return
                drip_w.write(b"\1")

        dripping = asyncio.create_task(drip())
        await asyncio.sleep(0.5)
        for _, w in cut:
            w.close()
        answers = await asyncio.gather(*(_answer(r, 10.0) for r, _ in stalled))
        for data, held in answers:  # closed at the idle deadline, without an answer
            assert data == b"" and held < LIMITS.idle_timeout + 1.0
        data, held = await _answer(chunked_r, 10.0)
        assert data == b"" and held < LIMITS.idle_timeout + 1.0
        data, _ = await _answer(drip_r, 10.0)
        held = time.monotonic() - drip_start
        assert data == b"" and LIMITS.body_timeout - 0.5 < held < LIMITS.body_timeout + 1.0
        dripping.cancel()
        for _, w in [*stalled, *cut, (drip_r, drip_w), (chunked_r, chunked_w)]:
            w.transport.abort()

    asyncio.run(scenario())
    assert not front.forwarded("attack")
    _logged(front, "request body stalled (idle deadline)")
    _logged(front, "request body stalled (total deadline)")
    _logged(front, "request body incomplete: connection closed")
    # The same request, complete, is forwarded whole.
    asyncio.run(_complete_upload(front, 3 * MIB, "whole"))
    assert front.forwarded("whole") == [
        {"path": "/v1/fleet/push-object", "declared": 3 * MIB, "received": 3 * MIB, "tag": "whole"}
    ]


async def _complete_upload(front: Front, size: int, tag: str, source: str = HONEST) -> bytes:
    reader, writer = await _open(front, source)
    writer.write(_head(size, tag) + b"\1" * size)
    status = await asyncio.wait_for(reader.readline(), 10.0)
    writer.transport.abort()
    return status


def test_oversized_bodies_are_refused_unread(front: Front) -> None:
    async def scenario() -> None:
        # Declared over the cap: 413 at once, before any body byte is sent.
        reader, writer = await _open(front)
        writer.write(_head(LIMITS.max_body_bytes + 1))
        data, _ = await _answer(reader, 5.0)
        assert data.startswith(b"HTTP/1.1 413 ")
        writer.transport.abort()
        # Chunked past the cap: 413 when it goes over.
        reader, writer = await _open(front)
        writer.write(_head(extra=b"transfer-encoding: chunked\r\n"))
        chunk = b"\1" * MIB
        for _ in range(5):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        data, _ = await _answer(reader, 5.0)
        assert data.startswith(b"HTTP/1.1 413 ")
        writer.transport.abort()

    asyncio.run(scenario())
    assert not front.forwarded("attack")


@pytest.mark.parametrize(
    "extra",
    [b"x-big: " + b"a" * (1 * MIB) + b"\r\n", b"".join(b"x-%d: 1\r\n" % i for i in range(100))],
    ids=["one-mebibyte-field", "100-fields"],
)
def test_oversized_heads_get_431(front: Front, extra: bytes) -> None:
    async def scenario() -> bytes:
        reader, writer = await _open(front)
        writer.write(_head(0, extra=extra))
        data, _ = await _answer(reader, 5.0)
        writer.transport.abort()
        return data

    assert asyncio.run(scenario()).startswith(b"HTTP/1.1 431 ")
    assert not front.forwarded("attack")


def test_one_address_cannot_take_every_buffered_byte(front: Front) -> None:
    """Uploads beyond an address's share are refused; another address still uploads."""

    async def scenario() -> None:
        hogs = [await _open(front) for _ in range(6)]
        for _, w in hogs:  # 6 x 3.5 MiB > the address's 16 MiB
            w.write(_head(4 * MIB) + b"\1" * (3 * MIB + MIB // 2))
        await asyncio.sleep(0.3)
        assert (await _complete_upload(front, 3 * MIB, "other")).startswith(b"HTTP/1.1 200 ")
        ends = await asyncio.gather(*(_answer(r, 5.0) for r, _ in hogs))
        # Two or more were ended before their body's end: answered 503, or reset while
        # still sending; the rest stalled until the idle deadline.
        assert sum(held < 0.5 for _, held in ends) >= 2
        assert all(data in (b"", *[d for d, _ in ends if d.startswith(b"HTTP/1.1 503 ")])
                   for data, _ in ends)  # fmt: skip
        for _, w in hogs:
            w.transport.abort()

    asyncio.run(scenario())
    assert len(front.forwarded("other")) == 1 and not front.forwarded("attack")
    _logged(front, "front refused 127.0.0.1: per-address buffered-body limit reached")


def test_memory_is_bounded_and_given_back(front: Front) -> None:
    """Bodies stalled from 8 addresses: RSS stays near the buffer limit, then drops back."""
    for _ in range(3):
        honest_round(front.port, front.tls)
    time.sleep(1.0)
    idle = rss_bytes(front.pid)
    peak = idle
    sources = tuple(f"127.0.1.{i}" for i in range(1, 9))
    plan = Attack(slowloris=0, no_handshake=0, stalled=32, big_heads=0, sources=sources,
                  declared=4 * MIB, sent=4 * MIB - 4096)  # fmt: skip

    async def scenario() -> int:
        nonlocal peak
        running = asyncio.create_task(attack(front.port, front.tls, ATTACK_SECONDS, plan))
        while not running.done():
            await asyncio.sleep(0.1)
            peak = max(peak, rss_bytes(front.pid))
        return (await running).statuses[503]

    asyncio.run(scenario())
    time.sleep(LIMITS.idle_timeout + 1.0)
    after = rss_bytes(front.pid)
    assert peak - idle > 16 * MIB  # the attack did make the front hold bodies
    assert peak - idle < LIMITS.max_buffered_bytes + 64 * MIB
    print(f"front RSS idle {idle / MIB:.0f} MiB, peak {peak / MIB:.0f}, after {after / MIB:.0f}")
    assert after - idle < 24 * MIB, (idle, peak, after)
    assert not front.forwarded("attack")
