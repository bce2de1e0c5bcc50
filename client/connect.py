"""Reaching the server: connection errors and a reachability probe.

A Flower SuperNode retries an unreachable SuperLink forever. Before an edge client
starts its SuperNode it therefore probes the server's address itself (TCP, then a TLS
handshake against the bundle's CA), and gives up with :class:`ServerUnreachableError`
after ``connect_timeout`` seconds.
"""

from __future__ import annotations

import socket
import ssl
import time
from logging import INFO
from pathlib import Path

from sepals.common.errors import SepalsError
from sepals.common.log import log

_RETRY_SECONDS = 1.0


class FederationConnectionError(SepalsError):
    """The client could not join the federation (refused, unreachable, or crashed)."""


class NodeRefusedError(FederationConnectionError):
    """The server refused this node: its authentication key is not registered."""


class ServerUnreachableError(FederationConnectionError):
    """The server did not answer within the connect timeout."""


def split_host_port(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (IPv6 hosts in brackets).

    Raises:
        ValueError: not ``HOST:PORT``.

    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"server address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _probe(host: str, port: int, ca_cert: Path | None, timeout: float) -> None:
    """One attempt: TCP connect, then (with ``ca_cert``) a verified TLS handshake."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if ca_cert is None:
            return
        context = ssl.create_default_context(cafile=str(ca_cert))
        with context.wrap_socket(sock, server_hostname=host) as tls:
            tls.do_handshake()


def wait_for_server(address: str, ca_cert: Path | None, timeout: float) -> None:
    """Wait until ``address`` answers; retry until ``timeout`` seconds have passed.

    The server answers when it accepts a TCP connection and, with ``ca_cert``, completes
    a TLS handshake whose certificate verifies against it.

    Raises:
        ServerUnreachableError: nothing answered in time (connection refused, no route,
            time-out, or a TLS handshake that never completed).
        FederationConnectionError: the server answered with a certificate that the
            bundle's CA did not sign or that does not name the host (no retry).
        ValueError: the address is malformed.

    """
    host, port = split_host_port(address)
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        left = deadline - time.monotonic()
        try:
            _probe(host, port, ca_cert, max(0.1, min(5.0, left)))
            return
        except ssl.SSLCertVerificationError as exc:
            raise FederationConnectionError(
                f"the server at {address} presented a certificate the bundle's CA does not "
                f"accept ({exc.verify_message}); is this the federation's server?"
            ) from exc
        except OSError as exc:  # refused, unreachable, timed out, TLS not ready
            problem = exc.strerror or type(exc).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServerUnreachableError(
                f"cannot reach the server at {address} within {timeout:g} s ({problem}, "
                f"{attempts} attempt(s)); is sepals-server running and the address right?"
            )
        if attempts == 1:
            log(INFO, "server %s not reachable yet (%s); retrying", address, problem)
        time.sleep(min(_RETRY_SECONDS, left))
