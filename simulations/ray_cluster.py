"""Running a simulation's clients on an existing Ray cluster (``--ray-address``).

Flower's Ray backend calls ``ray.init(**backend_config["init_args"])`` unless Ray is
already initialised, so an ``address`` there attaches the simulation to a running
cluster instead of starting a local Ray. Ray then takes its resources from the cluster:
``num_cpus`` (and a ``runtime_env``) must not be passed. Flower adds a runtime
environment of environment variables only (the driver's ``PYTHONPATH``); nothing is
installed on the nodes, so every node must already run sepals' environment. When the
run ends, Flower's ``ray.shutdown()`` disconnects this driver; it does not stop a
cluster this process did not start.

The parties stay as in a local run: the evaluator subprocess on this machine holds the
keys and writes the clients' key file; the server (this process) holds only the public
context; the Ray workers read the key file, so it and the run's output folder must lie
on a filesystem every node mounts at the same path.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from typing import Any

PROBE_SECONDS = 5.0
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_USAGE = "HOST:PORT, the head node's address as 'ray start --head --port PORT' prints it"


def parse_ray_address(text: str) -> tuple[str, int]:
    """Split a Ray cluster address ``HOST:PORT`` (or ``[IPv6]:PORT``) into host and port.

    Raises:
        ValueError: anything else, for example a Ray Client ``ray://`` address, ``auto``
            or a port outside 1..65535.

    """
    if not isinstance(text, str):
        raise ValueError(f"the Ray address must be {_USAGE}, got {text!r}")
    if "://" in text:
        raise ValueError(
            f"the Ray address must be {_USAGE} (run sepals-sim on a node of the cluster), "
            f"not a URL like {text!r}"
        )
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"the Ray address must be {_USAGE}, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"the Ray address must be {_USAGE}, got {text!r}") from None
        return host[1:-1], int(port_text)
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _HOSTNAME.match(host) or host.replace(".", "").isdigit():
            raise ValueError(f"the Ray address must be {_USAGE}, got {text!r}") from None
    return host, int(port_text)


def check_reachable(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Fail fast when nothing accepts connections at the cluster's address.

    Without this, ``ray.init`` retries an unreachable address for a minute or more.

    Raises:
        ValueError: a malformed address, or no listener at it within ``timeout`` s.

    """
    host, port = parse_ray_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(
            f"cannot reach the Ray cluster at {address} ({reason}); start its head with "
            f"'ray start --head --port {port}' or check the address"
        ) from None


def cluster_backend_config(address: str, log_to_driver: bool) -> dict[str, Any]:
    """Flower's backend configuration for clients on the cluster at ``address``.

    One client takes one CPU of any node, no GPU; the cluster's CPUs decide how many
    run at once.
    """
    parse_ray_address(address)
    return {
        "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
        "init_args": {
            "address": address,
            "include_dashboard": False,
            "logging_level": "ERROR",
            "log_to_driver": log_to_driver,
        },
    }


def cluster_client_slots(timeout: float = 180.0) -> int:
    """How many one-CPU clients the connected cluster runs at once (its live CPUs).

    Flower connects to the cluster in its own thread, so this waits up to ``timeout`` s
    for the connection; without one it answers 1 (the caller then waits for one client).
    """
    import ray  # heavy: imported when a run needs it, like Flower's simulation itself

    deadline = time.monotonic() + timeout
    while not ray.is_initialized() and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        nodes = ray.nodes()  # type: ignore[no-untyped-call]
    except Exception:  # not connected after all: wait for one client only
        return 1
    slots = sum(int(n.get("Resources", {}).get("CPU", 0)) for n in nodes if n.get("Alive"))
    return max(slots, 1)
