"""Helpers of the end-to-end tests that start sepals processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXAMPLE = ROOT / "examples" / "edge_app.py"


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a process with its output appended to ``log`` (telemetry off)."""
    full = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1", **(env or {}))
    with log.open("ab") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=full)


def client(
    bundle: Path, partition: int, partitions: int, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """``sepals-client`` running ``examples/edge_app.py`` on one partition."""
    return spawn(
        [
            str(BIN / "sepals-client"),
            "--bundle",
            str(bundle),
            "--app",
            f"{EXAMPLE}:make_app",
            "--app-arg",
            f"partition={partition}",
            "--app-arg",
            f"partitions={partitions}",
            *extra,
        ],
        log,
    )


def metrics(state: Path) -> list[dict[str, object]]:
    """The server's ``metrics.jsonl`` lines so far."""
    path = state / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, logs: list[Path], poll: float = 0.5
) -> None:
    """Wait until ``predicate()`` holds; fail with the logs' tails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    tails = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists()
    )
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process, then SIGKILL what is still alive after 30 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def descendants(pid: int) -> set[int]:
    """Every live process whose ancestry leads to ``pid`` (Linux ``/proc``)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        children = {c for c, p in parents.items() if p in frontier and c not in found}
        found |= children
        frontier = children
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still run (zombies count as gone)."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


def cmdlines() -> dict[int, str]:
    """Every process's command line, as ``ps`` shows it to any local user."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            out[int(entry.name)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return out
