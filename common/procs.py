"""Helpers for the Flower processes that sepals starts (SuperLink, SuperNode)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sepals.common.errors import SepalsError


class ProcessStartError(SepalsError):
    """A Flower process could not be found or did not come up."""


def flwr_executable(name: str) -> str:
    """Path of a Flower console script, preferring the one beside this interpreter."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ProcessStartError(f"{name} not found; is flwr installed in this environment?")
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for a Flower process: own ``FLWR_HOME``, telemetry off, our ``bin``.

    This interpreter's ``bin`` directory goes first on ``PATH``.

    Flower sends anonymous usage telemetry unless ``FLWR_TELEMETRY_ENABLED=0``; sepals
    turns it off for every process it starts (an explicit setting by the user wins).
    """
    env = dict(os.environ)
    # Flower starts its helpers (flower-superexec, flwr-serverapp) by name: make sure
    # they resolve to this environment's, even when it is not activated.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")]) if env.get("PATH") else bindir
    env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: deliver SIGTERM to this child when its parent dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_child(
    cmd: list[str], env: dict[str, str], log_path: Path, new_session: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with output appended to ``log_path``; it dies with this process."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as logfile:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
        )


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dial_host(host: str) -> str:
    """The address to connect to for a listening ``host`` (wildcards become loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def port_open(host: str, port: int) -> bool:
    """Whether something accepts connections on ``host:port``."""
    try:
        with socket.create_connection((dial_host(host), port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str, port: int, proc: subprocess.Popen[bytes], timeout: float, what: str
) -> None:
    """Wait until ``host:port`` accepts connections while ``proc`` is alive.

    Raises:
        ProcessStartError: ``proc`` exited or the port stayed closed for ``timeout`` s.

    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProcessStartError(f"{what} exited with code {proc.returncode}")
        if port_open(host, port):
            return
        time.sleep(0.2)
    raise ProcessStartError(f"{what} did not open {host}:{port} within {timeout:.0f} s")


def stop_child(
    proc: subprocess.Popen[bytes] | None, group: bool = False, grace: float = 15
) -> None:
    """SIGTERM ``proc`` (its process group if ``group``), then SIGKILL after ``grace`` s."""
    if proc is None or proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait()
