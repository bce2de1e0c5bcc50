"""``python -m sepals.server.front``: the front's process, as ``sepals-server`` starts it."""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import socket
import ssl
import sys
from logging import WARNING
from pathlib import Path

from sepals.common.log import configure_cli_logging, log
from sepals.server.front.app import FleetFront
from sepals.server.front.limits import FrontLimits
from sepals.server.front.listener import FrontListener

# Connections the kernel queues before the front accepts them.
BACKLOG = 1024
# Descriptors beyond the client connections: upstream connections, logs, the listeners.
SPARE_FDS = 128


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for every address ``host`` names (``0.0.0.0``, a name...).

    Raises:
        OSError: an address could not be bound.

    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _descriptors(limits: FrontLimits) -> None:
    """Raise the descriptor limit to what the connection limits need, if allowed."""
    # Each forwarded request holds a client connection and an upstream one.
    need = 2 * limits.max_connections + SPARE_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < need:
        log(
            WARNING,
            "front: %d file descriptors allowed, %d wanted for max_connections = %d",
            target,
            need,
            limits.max_connections,
        )


async def serve(
    front: FleetFront, limits: FrontLimits, tls: ssl.SSLContext | None, sockets: list[socket.socket]
) -> None:
    """Serve until SIGTERM or SIGINT, then close every connection."""
    listener = FrontListener(front, limits, tls)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
    try:
        await listener.serve(sockets)
    except asyncio.CancelledError:
        pass
    finally:
        await front.aclose()
        for sock in sockets:
            sock.close()


def main(argv: list[str] | None = None) -> int:
    """Serve the front: ``python -m sepals.server.front --host H --port P ...``."""
    parser = argparse.ArgumentParser(prog="sepals.server.front", description=__doc__)
    parser.add_argument("--host", required=True, help="public listen host")
    parser.add_argument("--port", type=int, required=True, help="public listen port")
    parser.add_argument("--upstream", required=True, help="SuperLink base URL (loopback)")
    parser.add_argument("--certfile", type=Path, help="TLS certificate of the public address")
    parser.add_argument("--keyfile", type=Path, help="TLS private key of the public address")
    parser.add_argument("--ca", type=Path, help="CA certificate that signs the upstream's")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP on both sides")
    FrontLimits.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        limits = FrontLimits.from_args(args)
    except ValueError as exc:
        print(f"sepals front: {exc}", file=sys.stderr)
        return 2
    if args.insecure:
        verify: ssl.SSLContext | bool = False
        tls: ssl.SSLContext | None = None
    else:
        if not (args.certfile and args.keyfile and args.ca):
            print("sepals front: --certfile, --keyfile and --ca are required", file=sys.stderr)
            return 2
        verify = ssl.create_default_context(cafile=str(args.ca))
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(str(args.certfile), str(args.keyfile))
    configure_cli_logging(verbose=False)
    _descriptors(limits)
    try:
        sockets = listening_sockets(args.host, args.port)
    except OSError as exc:
        print(f"sepals front: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    front = FleetFront(args.upstream, verify, max_body=limits.max_body_bytes)
    asyncio.run(serve(front, limits, tls, sockets))
    return 0
