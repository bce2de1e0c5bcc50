"""One client connection of the public front, read under the front's limits.

A connection must:

* finish its TLS handshake and its first request's head within ``header_timeout`` of
  the accept (a later request's head within ``header_timeout`` of its first byte);
* keep the head within ``max_header_bytes`` and ``max_headers`` (``431`` otherwise, and
  nothing more of it is parsed);
* declare a body of at most ``max_body_bytes`` (``413`` before the body is read), or,
  chunked, stay within it (``413`` when it goes over);
* find room for each piece of its body among the bytes its address and everyone may
  hold (``503`` with ``Retry-After`` otherwise);
* deliver the whole body within ``body_timeout``, pausing at most ``idle_timeout``.

Only a request whose body arrived complete (``Content-Length`` matched exactly, or the
chunked body's last chunk) reaches the ASGI app, with its whole body; anything else is
closed without reaching the app, and so never the SuperLink. Responses stream out,
each write drained within ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import h11

from sepals.server.front.limits import MIB

if TYPE_CHECKING:
    from sepals.server.front.listener import FrontListener

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
# Bytes asked of the socket per read; the stream buffers at most twice this before it
# stops reading the socket.
READ_SIZE = 64 * 1024
# What a closed connection is taken to have let go: asyncio's TLS read buffer (256 KiB)
# and the stream's (up to 128 KiB).
CONNECTION_BYTES = 384 * 1024
# How long, and how much of, a refused client's remaining bytes are read and dropped
# before closing (so that it can read the answer).
LINGER = 1.0
LINGER_BYTES = MIB
_REASONS = {
    400: b"Bad Request",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


class Refused(Exception):
    """A request refused with ``status`` (``0``: closed without an answer)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _refusal(status: int) -> bytes:
    body = _REASONS[status].lower() + b"\n"
    extra = b"retry-after: 5\r\n" if status == 503 else b""
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\n%sconnection: close\r\n\r\n%s"
        % (status, _REASONS[status], len(body), extra, body)
    )


class Connection:
    """One client connection: read heads and bodies under the limits, run the app."""

    def __init__(self, listener: FrontListener, sock: socket.socket, key: str) -> None:
        """Take over ``sock``, accepted by ``listener`` and counted against ``key``."""
        self.listener = listener
        self.limits = listener.limits
        self.sock = sock
        self.key = key
        self.task: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.buffered = 0  # body bytes counted against the address and the total
        self.counted = True  # the connection is counted by the admission
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes
        )

    def drop(self) -> None:
        """End this connection now to make room (its counts are given back at once)."""
        self.listener.refusals.note("dropped to make room for a lighter address", self.key)
        self.forget()
        if self.transport is not None:
            self.transport.abort()
        if self.task is not None:
            self.task.cancel()

    def forget(self) -> None:
        """Give back what this connection holds of the limits (once)."""
        self.listener.waiting.leave(id(self))
        self.listener.uploading.leave(id(self))
        if self.buffered:
            self.listener.admission.release(self.key, self.buffered)
            self.listener.released(self.buffered)
            self.buffered = 0
        if self.counted:
            self.listener.admission.close(self.key)
            self.counted = False

    async def serve(self) -> None:
        """Handshake, then requests until the client, the limits or the protocol end it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.header_timeout
        self.listener.waiting.touch(id(self), self.key, self.drop)
        try:
            reader = asyncio.StreamReader(limit=READ_SIZE)
            protocol = asyncio.StreamReaderProtocol(reader)
            try:
                async with asyncio.timeout_at(deadline):
                    transport, _ = await loop.connect_accepted_socket(
                        lambda: protocol,
                        self.sock,
                        ssl=self.listener.ssl_context,
                        ssl_handshake_timeout=self.limits.header_timeout
                        if self.listener.ssl_context
                        else None,
                    )
            except (TimeoutError, OSError):
                self.listener.refusals.note("TLS handshake not complete or failed", self.key)
                return
            self.transport = transport  # type: ignore[assignment]
            transport.set_write_buffer_limits(high=READ_SIZE)  # type: ignore[attr-defined]
            self.reader = reader
            self.writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
            await self._requests(deadline)
        finally:
            self.forget()
            self.task = None  # no cycle through a finished task's exception
            if self.transport is not None:
                self.transport.abort()
            else:
                self.sock.close()
            self.listener.released(CONNECTION_BYTES)

    async def _requests(self, deadline: float) -> None:
        try:
            await self._run(deadline)
        except Refused as exc:
            self.listener.refusals.note(exc.reason, self.key)
            status = exc.status
        except (OSError, h11.LocalProtocolError) as exc:
            self.listener.refusals.note(f"connection failed ({exc.__class__.__name__})", self.key)
            return
        else:
            await self._close()
            return
        if status and not self.writer.is_closing():
            await self._refuse(status)

    async def _refuse(self, status: int) -> None:
        """Answer ``status``, then discard what the client still sends, briefly.

        A client that is still sending when the connection closes gets a reset, and with
        it may lose the answer; so the front reads and drops (never parses or keeps) up
        to :data:`LINGER_BYTES` more for up to :data:`LINGER` seconds before it closes.
        """
        self.writer.write(_refusal(status))
        dropped = 0
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(min(LINGER, self.limits.idle_timeout)):
                await self.writer.drain()
                while dropped < LINGER_BYTES and (data := await self.reader.read(READ_SIZE)):
                    dropped += len(data)
        await self._close(LINGER)

    async def _close(self, within: float | None = None) -> None:
        """Flush and close within ``within`` s (default ``idle_timeout``); then it is cut."""
        self.writer.close()
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(within or self.limits.idle_timeout):
                await self.writer.wait_closed()

    async def _run(self, deadline: float) -> None:
        """Serve requests until the client or the protocol closes the connection."""
        loop = asyncio.get_running_loop()
        while True:
            request = await self._head(deadline)
            if request is None:
                return
            self.listener.waiting.leave(id(self))
            await self._serve(request)
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return
            self.h11.start_next_cycle()
            self.listener.waiting.touch(id(self), self.key, self.drop)
            if not self.h11.trailing_data[0]:
                try:
                    async with asyncio.timeout(self.limits.idle_timeout):
                        await self._feed()
                except TimeoutError:
                    return  # an idle kept-alive connection: closed quietly
            deadline = loop.time() + self.limits.header_timeout

    async def _feed(self) -> None:
        self.h11.receive_data(await self.reader.read(READ_SIZE))

    async def _event(self) -> h11.Event | type[h11.NEED_DATA]:
        try:
            event = self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            if self.reader.at_eof():
                raise Refused(0, "request incomplete: connection closed") from None
            status = 431 if exc.error_status_hint == 431 else 400
            what = "request head too large" if status == 431 else "malformed request"
            raise Refused(status, what) from None
        if event is h11.NEED_DATA:
            await self._feed()
        elif event is h11.PAUSED:  # more bytes after a request that ends the connection
            raise Refused(0, "request after the connection's last")
        return event  # type: ignore[return-value]

    async def _head(self, deadline: float) -> h11.Request | None:
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    event = await self._event()
                    if isinstance(event, h11.Request):
                        break
                    if isinstance(event, h11.ConnectionClosed):
                        return None
        except TimeoutError:
            raise Refused(
                0, f"request head not complete within {self.limits.header_timeout:g} s"
            ) from None
        if len(event.headers) > self.limits.max_headers:
            raise Refused(431, f"more than {self.limits.max_headers} header fields")
        return event

    def _check_framing(self, request: h11.Request) -> bool:
        """Whether the request has a body; refuses one declared over the cap."""
        lengths = [v for k, v in request.headers if k == b"content-length"]
        chunked = any(k == b"transfer-encoding" for k, _ in request.headers)
        if chunked and lengths:
            raise Refused(400, "both Content-Length and Transfer-Encoding")
        size = int(lengths[0]) if lengths else 0  # h11 checked it is one decimal number
        if size > self.limits.max_body_bytes:
            raise Refused(413, f"declared body over {self.limits.max_body_bytes} bytes")
        return chunked or size > 0

    async def _serve(self, request: h11.Request) -> None:
        chunks = await self._body() if self._check_framing(request) else []
        await self._run_app(request, chunks)
        del chunks
        if self.buffered:
            self.listener.admission.release(self.key, self.buffered)
            self.listener.released(self.buffered)
            self.buffered = 0

    def _hold(self, size: int) -> None:
        """Count ``size`` more body bytes (making room by dropping, if need be, an upload).

        The upload dropped is the idlest of an address that holds more than this one.
        """
        admission = self.listener.admission
        uploading = self.listener.uploading
        while not admission.room(size) and uploading.drop_for(
            self.key, admission.buffered_by, size
        ):
            pass
        refused = admission.reserve(self.key, size)
        if refused is not None:
            raise Refused(503, refused)
        self.buffered += size

    async def _body(self) -> list[bytes]:
        if self.h11.they_are_waiting_for_100_continue:
            await self._write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        chunks: list[bytes] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + self.limits.body_timeout
        uploading = self.listener.uploading
        uploading.touch(id(self), self.key, self.drop)
        try:
            while True:
                pause = min(end, loop.time() + self.limits.idle_timeout)
                try:
                    async with asyncio.timeout_at(pause):
                        event = await self._event()
                except TimeoutError:
                    which = "idle" if pause < end else "total"
                    raise Refused(0, f"request body stalled ({which} deadline)") from None
                except Refused as exc:
                    if not exc.status:
                        raise Refused(0, "request body incomplete: connection closed") from None
                    raise Refused(exc.status, "malformed request body") from None
                if isinstance(event, h11.Data):
                    if self.buffered + len(event.data) > self.limits.max_body_bytes:
                        raise Refused(413, f"body over {self.limits.max_body_bytes} bytes")
                    self._hold(len(event.data))
                    chunks.append(bytes(event.data))
                    uploading.touch(id(self), self.key, self.drop)
                elif isinstance(event, h11.EndOfMessage):
                    return chunks
                elif isinstance(event, h11.ConnectionClosed):
                    raise Refused(0, "request body incomplete: connection closed")
        except BaseException:
            chunks.clear()  # an incomplete body is let go now, whoever keeps the traceback
            raise
        finally:
            uploading.leave(id(self))

    async def _run_app(self, request: h11.Request, chunks: list[bytes]) -> None:
        target = request.target
        raw_path, _, query = target.partition(b"?")
        try:
            path = unquote(raw_path.decode("ascii"), errors="strict")
        except UnicodeError:
            raise Refused(400, "request target not ASCII or UTF-8") from None
        sock = self.writer.get_extra_info("sockname")
        peer = self.writer.get_extra_info("peername")
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode("ascii"),
            "method": request.method.decode("ascii"),
            "scheme": "https" if self.listener.ssl_context else "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": [(k, v) for k, v in request.headers],
            "client": (peer[0], peer[1]) if peer else None,
            "server": (sock[0], sock[1]) if sock else None,
        }
        messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
        messages.append({"type": "http.request", "body": b"", "more_body": False})
        chunks.clear()
        done = asyncio.get_running_loop().create_future()

        async def receive() -> Message:
            if messages:
                return messages.pop(0)
            await done  # the body is all delivered: nothing more until the end
            return {"type": "http.disconnect"}

        started = False

        async def send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                event = h11.Response(status_code=int(message["status"]), headers=headers)
                await self._write(self.h11.send(event))
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body:
                    await self._write(self.h11.send(h11.Data(data=body)))
                if not message.get("more_body", False):
                    await self._write(self.h11.send(h11.EndOfMessage()))

        try:
            await self.listener.app(scope, receive, send)
        except (Refused, OSError):
            raise  # the client's side failed, not the app
        except Exception as exc:
            if started:
                raise Refused(0, f"app failed mid-response ({exc.__class__.__name__})") from exc
            raise Refused(500, f"app failed ({exc.__class__.__name__})") from exc
        finally:
            messages.clear()
            done.set_result(None)
        if not started:
            raise Refused(500, "app sent no response")

    async def _write(self, data: bytes | None) -> None:
        if not data:
            return
        self.writer.write(data)
        try:
            async with asyncio.timeout(self.limits.idle_timeout):
                await self.writer.drain()
        except TimeoutError:
            raise Refused(0, "response not read (idle deadline)") from None
