"""The public front's listener: who may connect, and what the front holds in total.

It accepts connections itself, so that each is counted against its address and the
total (:class:`~sepals.server.front.limits.Admission`) before its TLS handshake, and
reset at once above its address's share, or above the total unless a lighter address
may take the place of an idle connection (:class:`~sepals.server.front.limits.Lineup`).
Each admitted connection is served by a :class:`~sepals.server.front.connection.Connection`
under the per-request limits. Refusals are logged one line per kind
(:class:`~sepals.server.front.limits.RefusalLog`); the memory that connections and
bodies let go is given back to the system.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable

from sepals.server.front.connection import Connection, Message, Scope
from sepals.server.front.limits import (
    MIB,
    Admission,
    FrontLimits,
    Lineup,
    RefusalLog,
    address_key,
    give_back_memory,
)

ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]
# The C heap is trimmed once this many bytes were let go, at most every TRIM_DELAY s.
TRIM_AFTER = MIB
TRIM_DELAY = 1.0


def _reset(sock: socket.socket) -> None:
    """Close with a reset: no TIME_WAIT, no buffers kept for a refused connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FrontListener:
    """Serves one ASGI app on listening sockets under :class:`FrontLimits`.

    Args:
        app: The ASGI app (the Fleet front); it gets complete requests only.
        limits: Deadlines and sizes.
        ssl_context: Server TLS context, or ``None`` for plain HTTP.

    """

    def __init__(
        self, app: ASGIApp, limits: FrontLimits, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.app = app
        self.limits = limits
        self.ssl_context = ssl_context
        self.admission = Admission(limits)
        self.refusals = RefusalLog()
        # Connections without a request in progress (TLS handshake, head, kept alive)
        # and connections whose body is arriving, each least recently active first.
        self.waiting = Lineup()
        self.uploading = Lineup()
        self._tasks: set[asyncio.Task[None]] = set()
        self._trim: asyncio.TimerHandle | None = None
        self._freed = 0

    async def serve(self, sockets: list[socket.socket]) -> None:
        """Accept on ``sockets`` until cancelled; then close every open connection."""
        accepting = [asyncio.create_task(self._accept(s)) for s in sockets]
        try:
            await asyncio.gather(*accepting)
        finally:
            for task in [*accepting, *self._tasks]:
                task.cancel()
            await asyncio.gather(*accepting, *self._tasks, return_exceptions=True)

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        listening.setblocking(False)
        while True:
            try:
                sock, peer = await loop.sock_accept(listening)
            except OSError as exc:  # out of descriptors, or the peer gave up
                self.refusals.note(f"accept failed ({exc.__class__.__name__})", "-")
                await asyncio.sleep(0.05)
                continue
            key = address_key(str(peer[0]))
            if self.admission.full(key):
                self.waiting.drop_for(key, self.admission.held, 1, grace=0.0)
            refused = self.admission.open(key)
            if refused is not None:
                self.refusals.note(refused, key)
                _reset(sock)
                continue
            connection = Connection(self, sock, key)
            task = asyncio.create_task(connection.serve())
            connection.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def released(self, size: int) -> None:
        """About ``size`` bytes were let go: trim the C heap once a mebibyte is free."""
        self._freed += size
        if self._freed >= TRIM_AFTER and self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trim_now)

    def _trim_now(self) -> None:
        self._trim = None
        self._freed = 0
        give_back_memory()
