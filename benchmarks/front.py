"""The public front under a slow-connection attack: honest rounds against no attack.

Starts, on loopback, a fake SuperLink that records what reaches it (plain HTTP) and the
front (``python -m sepals.server.front``, TLS, its default limits), then measures an
honest SuperNode at ``127.0.0.2``, each round on a new TLS connection: a heartbeat,
``pull-messages``, a ``pull-object`` of 4 MiB, two ``push-object`` of 4 MiB and
``push-messages``.

1. **Baseline**: honest rounds for half of ``--baseline-seconds`` with nothing else
   running, and again for the other half after the attack (so that a change in the
   machine's load during the run shows).
2. **Attack**: honest rounds for ``--seconds`` while an attacker process keeps open,
   from ``127.0.0.1`` (or from ``--sources`` addresses 127.0.1.x):
   ``--slowloris`` TLS connections that never finish their head (a header line every
   0.5 s), ``--no-handshake`` TCP connections that never start TLS, ``--stalled``
   connections that send 15 of a declared 16 MiB and stall, and one connection sending a
   1 MiB head; each is opened again 0.2 s after the front drops it.

It prints the machine's load average, the median and 95th-percentile round time of each
phase, the ratio of the attack's median to the baseline's (target: at most
:data:`TARGET_RATIO`), the honest requests that failed, the request bodies the fake
SuperLink received incomplete (target 0), the CPU the front and the attacker used, how
long the front held attack connections, and the front's resident memory
(``/proc/PID/status``) idle, at its peak under attack, and 3 s after the attack ended
(target: at most :data:`TARGET_RSS_ABOVE_IDLE` bytes above idle). Figures are printed
as met or MISSED, never asserted. The attacker, the front and the honest client share
the machine's cores (a real attacker spends its own), and the machine may be shared
with other work: the load average says how busy it was.

Usage: ``python -m benchmarks.front [--seconds 60] [--baseline-seconds 20]
[--slowloris 300] [--no-handshake 100] [--stalled 40] [--sources 1]``

The attack and the fake SuperLink are also what ``tests/test_front_attacks.py`` runs,
at small sizes and short deadlines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from sepals.common.procs import free_port, wait_for_port
from sepals.server.control.tls_keys import make_tls
from sepals.server.front.limits import MIB, FrontLimits

TARGET_RATIO = 1.5
TARGET_RSS_ABOVE_IDLE = 256 * MIB
HONEST = "127.0.0.2"
ATTACKER = "127.0.0.1"
OBJECT_BYTES = 4 * MIB
# The fake SuperLink answers with this many bytes when the request asks for them.
REPLY_BYTES = "x-bench-reply-bytes"


# -- the fake SuperLink ---------------------------------------------------------------
class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RecordingUpstream

    def do_POST(self) -> None:
        declared = int(self.headers.get("content-length", "0"))
        received = len(self.rfile.read(declared)) if declared else 0
        tag = self.headers.get("x-tag", "")
        self.server.record(
            {"path": self.path, "declared": declared, "received": received, "tag": tag}
        )
        if received < declared:
            self.close_connection = True
            return
        reply = b"\0" * int(self.headers.get(REPLY_BYTES, "8"))
        self.send_response(200)
        self.send_header("content-type", "application/protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the records are the log."""


class RecordingUpstream(ThreadingHTTPServer):
    """A fake SuperLink on loopback that records every request that reaches it.

    Args:
        record_file: Also append each record to this file as a JSON line.

    """

    daemon_threads = True

    def __init__(self, record_file: Path | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Recorder)
        self.port = int(self.server_address[1])
        self.seen: list[dict[str, Any]] = []
        self.record_file = record_file
        self._lock = threading.Lock()

    def record(self, entry: dict[str, Any]) -> None:
        """Keep (and write) one request's record."""
        with self._lock:
            self.seen.append(entry)
            if self.record_file is not None:
                with self.record_file.open("a") as fh:
                    fh.write(json.dumps(entry) + "\n")

    @contextlib.contextmanager
    def running(self) -> Iterator[RecordingUpstream]:
        """Serve in a thread for the duration of the block."""
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.shutdown()
            self.server_close()


# -- the front, in its own process ------------------------------------------------------
@dataclass
class Tls:
    """A CA and a server certificate for 127.0.0.1, written to a directory."""

    directory: Path

    def __post_init__(self) -> None:
        ca, _, cert, key = make_tls("127.0.0.1", 1)
        for name, pem in (("ca.pem", ca), ("server.pem", cert), ("server.key", key)):
            (self.directory / name).write_bytes(pem)

    def client_context(self) -> ssl.SSLContext:
        """What an honest SuperNode verifies the front with."""
        return ssl.create_default_context(cafile=str(self.directory / "ca.pem"))

    def front_args(self) -> list[str]:
        """The front's TLS flags."""
        d = self.directory
        return ["--certfile", str(d / "server.pem"), "--keyfile", str(d / "server.key"),
                "--ca", str(d / "ca.pem")]  # fmt: skip


def start_front(
    port: int, upstream_port: int, limits: FrontLimits, tls: Tls | None, log: Path
) -> subprocess.Popen[bytes]:
    """``python -m sepals.server.front`` on ``127.0.0.1:port``, ready to serve."""
    cmd = [sys.executable, "-m", "sepals.server.front", "--host", "127.0.0.1",
           "--port", str(port), "--upstream", f"http://127.0.0.1:{upstream_port}",
           *(tls.front_args() if tls else ["--insecure"]), *limits.to_args()]  # fmt: skip
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    wait_for_port("127.0.0.1", port, proc, 60.0, "the front")
    return proc


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (``VmRSS`` in ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


# -- the attacker ---------------------------------------------------------------------
@dataclass
class AttackStats:
    """What the attack's connections saw.

    Attributes:
        opened: Connections the attacker opened.
        held: Seconds each connection stayed open until the front ended it.
        statuses: HTTP status codes the front answered with.

    """

    opened: int = 0
    held: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        held = sorted(self.held) or [0.0]
        return {"opened": self.opened, "closed_by_front": len(self.held),
                "held_max_s": held[-1], "held_median_s": statistics.median(held),
                "held": [round(h, 3) for h in self.held],
                "statuses": {str(k): v for k, v in self.statuses.items()}}  # fmt: skip


async def _connect(
    port: int, source: str, tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, local_addr=(source, 0),
        server_hostname="127.0.0.1" if tls else None,
    )  # fmt: skip


async def _until_closed(reader: asyncio.StreamReader, stats: AttackStats, until: float) -> bool:
    """Read until the front closes (``True``) or ``until`` passes (``False``)."""
    loop = asyncio.get_running_loop()
    answer = b""
    while loop.time() < until:
        try:
            data = await asyncio.wait_for(reader.read(65536), until - loop.time())
        except TimeoutError:
            return False
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            if answer.startswith(b"HTTP/1.1 "):
                stats.statuses[int(answer[9:12])] += 1
            return True
        answer += data[:64] if len(answer) < 64 else b""
    return False


@dataclass(frozen=True)
class Attack:
    """One slow-connection attack.

    Attributes:
        slowloris: Connections that never finish their head (a header line every 0.5 s).
        no_handshake: Connections that never start the TLS handshake.
        stalled: Connections that send ``sent`` bytes of a declared ``declared`` and stall.
        big_heads: Connections that send a 1 MiB head.
        sources: Loopback addresses the connections come from, in turn.
        declared: Body length the stalled connections declare.
        sent: Body bytes they send before stalling.

    """

    slowloris: int = 300
    no_handshake: int = 100
    stalled: int = 40
    big_heads: int = 1
    sources: tuple[str, ...] = (ATTACKER,)
    declared: int = 16 * MIB
    sent: int = 15 * MIB


async def _slot(kind: str, port: int, source: str, tls: ssl.SSLContext | None,
                until: float, stats: AttackStats, plan: Attack) -> None:  # fmt: skip
    """Keep one attack connection of ``kind`` open, reopening it when the front drops it."""
    loop = asyncio.get_running_loop()
    filler = b"\0" * plan.sent if kind == "stalled" else b""
    while loop.time() < until:
        start = loop.time()
        stats.opened += 1
        writer: asyncio.StreamWriter | None = None
        closed = True
        try:
            reader, writer = await _connect(port, source, None if kind == "no-handshake" else tls)
            start = loop.time()  # held: from the connection's start to the front's close
            if kind == "slow-head":
                writer.write(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nhost: x\r\n")
                while loop.time() < until and not writer.is_closing():
                    if await _until_closed(reader, stats, min(until, loop.time() + 0.5)):
                        break
                    writer.write(b"x-slow: 1\r\n")
                closed = loop.time() < until
            else:
                if kind == "stalled":
                    writer.write(b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\n"
                                 b"content-length: %d\r\n\r\n" % plan.declared)  # fmt: skip
                    writer.write(filler)
                elif kind == "big-head":
                    writer.write(b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\n"
                                 b"x-big: " + b"a" * MIB + b"\r\n\r\n")  # fmt: skip
                closed = await _until_closed(reader, stats, until)
        except (OSError, ssl.SSLError, TimeoutError):
            pass
        finally:
            if writer is not None:
                writer.transport.abort()
        if closed:
            stats.held.append(loop.time() - start)
        await asyncio.sleep(0.2)  # then open it again


async def attack(
    port: int, tls: ssl.SSLContext | None, seconds: float, plan: Attack
) -> AttackStats:
    """Run ``plan`` against the front on ``port`` for ``seconds``; what its connections saw."""
    stats = AttackStats()
    until = asyncio.get_running_loop().time() + seconds
    kinds = ["slow-head"] * plan.slowloris + ["no-handshake"] * plan.no_handshake
    kinds += ["stalled"] * plan.stalled + ["big-head"] * plan.big_heads
    sources = [plan.sources[i % len(plan.sources)] for i in range(len(kinds))]
    await asyncio.gather(
        *(_slot(k, port, s, tls, until, stats, plan) for k, s in zip(kinds, sources, strict=True))
    )
    return stats


# -- the honest SuperNode -------------------------------------------------------------
ROUND = [
    ("send-node-heartbeat", 64, 16),
    ("pull-messages", 128, 4096),
    ("pull-object", 128, OBJECT_BYTES),
    ("push-object", OBJECT_BYTES, 16),
    ("push-object", OBJECT_BYTES, 16),
    ("push-messages", 4096, 64),
]


def honest_round(
    port: int, tls: ssl.SSLContext | None, source: str = HONEST, retries: int = 0
) -> int:
    """One SuperNode round on a new connection; the requests that did not answer 200.

    ``retries``: how many times a request that failed is sent again first, as a
    SuperNode's transport retries one (Flower's retry invoker).
    """
    scheme = "https" if tls else "http"
    transport = httpx.HTTPTransport(local_address=source, verify=tls or False)
    failed = 0
    with httpx.Client(transport=transport, base_url=f"{scheme}://127.0.0.1:{port}",
                      timeout=60.0) as client:  # fmt: skip
        for route, up, down in ROUND:
            for attempt in range(retries + 1):
                try:
                    res = client.post(f"/v1/fleet/{route}", content=b"\1" * up,
                                      headers={REPLY_BYTES: str(down)})  # fmt: skip
                    ok = res.status_code == 200 and len(res.content) == down
                except httpx.HTTPError:
                    ok = False
                if ok:
                    break
                if attempt == retries:
                    failed += 1
    return failed


def _rounds(port: int, tls: ssl.SSLContext, seconds: float) -> tuple[list[float], int]:
    times: list[float] = []
    failed = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        failed += honest_round(port, tls)
        times.append(time.perf_counter() - start)
    return times, failed


class _RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.1):
            with contextlib.suppress(OSError, ValueError):
                self.peak = max(self.peak, rss_bytes(self.pid))


def _row(name: str, value: str, met: bool | None = None) -> None:
    verdict = "" if met is None else ("met" if met else "MISSED")
    print(f"{name:<44} {value:<40} {verdict}", flush=True)


def _summary(times: list[float]) -> str:
    q = statistics.quantiles(times, n=20)[-1] if len(times) > 1 else times[0]
    return (
        f"median {statistics.median(times) * 1000:.0f} ms, p95 {q * 1000:.0f} ms (n={len(times)})"
    )


def cpu_seconds(pid: int) -> float:
    """User and system CPU time ``pid`` has used (``/proc/PID/stat``)."""
    fields_after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_after_name[11]) + int(fields_after_name[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class _Measured:
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    hit: list[float] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    rss: tuple[int, int, int] = (0, 0, 0)  # idle, peak, after the attack
    front_cpu: float = 0.0  # share of one core, under attack
    stats: dict[str, Any] = field(default_factory=dict)
    load: tuple[float, float] = (0.0, 0.0)


def _measure(args: argparse.Namespace, tls: Tls, port: int, front: int, tmp: Path) -> _Measured:
    """Baseline, attack, baseline again: honest rounds and the front's memory and CPU."""
    m = _Measured(load=(os.getloadavg()[0], 0.0))
    ctx = tls.client_context()
    honest_round(port, ctx)  # warm up
    time.sleep(1.0)
    idle = rss_bytes(front)
    m.before, failed = _rounds(port, ctx, args.baseline_seconds / 2)
    m.failed.append(failed)
    sources = tuple(f"127.0.1.{i + 1}" for i in range(args.sources))
    plan = Attack(
        slowloris=args.slowloris,
        no_handshake=args.no_handshake,
        stalled=args.stalled,
        sources=sources if args.sources > 1 else (ATTACKER,),
    )
    attacker = start_attacker(port, tmp / "ca.pem", args.seconds, plan)
    sampler = _RssSampler(front)
    sampler.start()
    time.sleep(2.0)  # let the attack fill its connections first
    cpu, wall = cpu_seconds(front), time.monotonic()
    m.hit, failed = _rounds(port, ctx, max(args.seconds - 2.0, 1.0))
    m.front_cpu = (cpu_seconds(front) - cpu) / (time.monotonic() - wall)
    m.failed.append(failed)
    m.stats = attack_stats(attacker, args.seconds + 120)
    sampler.halt.set()
    time.sleep(3.0)
    m.rss = (idle, sampler.peak, rss_bytes(front))
    m.after, failed = _rounds(port, ctx, args.baseline_seconds / 2)
    m.failed.append(failed)
    m.load = (m.load[0], os.getloadavg()[0])
    return m


def run(args: argparse.Namespace) -> None:
    """Baseline, attack and baseline again, then the figures."""
    with tempfile.TemporaryDirectory(prefix="sepals-front-bench-") as tmp:
        tmp_dir = Path(tmp)
        tls = Tls(tmp_dir)
        records = tmp_dir / "upstream.jsonl"
        upstream = subprocess.Popen([sys.executable, "-m", "benchmarks.front", "--upstream",
                                     str(records)], stdout=subprocess.PIPE)  # fmt: skip
        front: subprocess.Popen[bytes] | None = None
        try:
            upstream_port = int((upstream.stdout.readline() if upstream.stdout else b"0").strip())
            port = free_port()
            front = start_front(port, upstream_port, FrontLimits(), tls, tmp_dir / "front.log")
            m = _measure(args, tls, port, front.pid, tmp_dir)
        finally:
            if front is not None:
                stop_process(front)
            stop_process(upstream)
        seen = [json.loads(x) for x in records.read_text().splitlines()] if records.exists() else []
    _report(m, seen)


def _report(m: _Measured, seen: list[dict[str, Any]]) -> None:
    base = m.before + m.after
    ratio = statistics.median(m.hit) / statistics.median(base)
    partial = sum(1 for r in seen if r["received"] != r["declared"])
    stray = sum(1 for r in seen if r["declared"] == 16 * MIB)
    idle, peak, after = m.rss
    _row("load average (1 min) at start / end", f"{m.load[0]:.1f} / {m.load[1]:.1f}")
    _row("honest rounds, no attack (before)", _summary(m.before))
    _row("honest rounds, no attack (after)", _summary(m.after))
    _row("honest rounds, under attack", _summary(m.hit))
    _row("median round time, attack / no attack", f"{ratio:.2f}x", ratio <= TARGET_RATIO)
    _row("honest requests failed (before, under, after)", ", ".join(map(str, m.failed)),
         sum(m.failed) == 0)  # fmt: skip
    _row("partial bodies that reached the SuperLink", str(partial + stray), partial + stray == 0)
    _row("front CPU under attack", f"{m.front_cpu * 100:.0f}% of one core")
    _row("attacker CPU", f"{m.stats['cpu_share'] * 100:.0f}% of one core")
    _row("attack connections opened", str(m.stats["opened"]))
    _row("attack connections the front closed", f"{m.stats['closed_by_front']}, held at most "
         f"{m.stats['held_max_s']:.1f} s (median {m.stats['held_median_s']:.1f} s)")  # fmt: skip
    _row("answers to the attack", json.dumps(m.stats["statuses"]))
    _row("front RSS idle / peak / after", f"{idle / MIB:.0f} / {peak / MIB:.0f} / "
         f"{after / MIB:.0f} MiB")  # fmt: skip
    _row("front RSS above idle, peak", f"{max(peak - idle, 0) / MIB:.0f} MiB",
         peak - idle <= TARGET_RSS_ABOVE_IDLE)  # fmt: skip
    _row("front RSS above idle, after the attack", f"{max(after - idle, 0) / MIB:.0f} MiB",
         after - idle <= TARGET_RSS_ABOVE_IDLE)  # fmt: skip


def start_attacker(port: int, ca: Path, seconds: float, plan: Attack) -> subprocess.Popen[bytes]:
    """The attack in its own process (``--sources`` addresses 127.0.1.x if not one).

    Returns once it has started; its last line of output is :meth:`AttackStats.as_dict`
    as JSON, with the attacker's CPU share.
    """
    if len(plan.sources) > 1 and plan.sources != tuple(
        f"127.0.1.{i + 1}" for i in range(len(plan.sources))
    ):
        raise ValueError("an attacker process attacks from 127.0.0.1 or from 127.0.1.1..N")
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.front", "--attack", str(port), "--ca", str(ca),
         "--seconds", str(seconds), "--slowloris", str(plan.slowloris), "--no-handshake",
         str(plan.no_handshake), "--stalled", str(plan.stalled), "--big-heads",
         str(plan.big_heads), "--sources", str(len(plan.sources))],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    if proc.stdout is None or proc.stdout.readline().strip() != b"attacking":
        stop_process(proc)
        raise RuntimeError("the attacker process did not start")
    return proc


def attack_stats(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """Wait for an attacker process; what its connections saw."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        stop_process(proc)
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def _serve_upstream(records: Path) -> None:
    server = RecordingUpstream(records)
    print(server.port, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()


def _run_attack(args: argparse.Namespace) -> None:
    tls = ssl.create_default_context(cafile=args.ca)
    sources = (
        tuple(f"127.0.1.{i + 1}" for i in range(args.sources)) if args.sources > 1 else (ATTACKER,)
    )
    plan = Attack(
        slowloris=args.slowloris,
        no_handshake=args.no_handshake,
        stalled=args.stalled,
        big_heads=args.big_heads,
        sources=sources,
    )
    print("attacking", flush=True)
    start = time.monotonic()
    stats = asyncio.run(attack(args.attack, tls, args.seconds, plan))
    share = time.process_time() / (time.monotonic() - start)
    print(json.dumps({**stats.as_dict(), "cpu_share": share}), flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (or, with ``--upstream`` / ``--attack``, one of its processes)."""
    parser = argparse.ArgumentParser(prog="benchmarks.front", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the attack")
    parser.add_argument("--baseline-seconds", type=float, default=20.0)
    parser.add_argument("--slowloris", type=int, default=300)
    parser.add_argument("--no-handshake", type=int, default=100)
    parser.add_argument("--stalled", type=int, default=40)
    parser.add_argument("--big-heads", type=int, default=1)
    parser.add_argument(
        "--sources", type=int, default=1, help="attack from this many loopback addresses"
    )
    parser.add_argument("--upstream", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--attack", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.upstream is not None:
        _serve_upstream(args.upstream)
    elif args.attack is not None:
        _run_attack(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
