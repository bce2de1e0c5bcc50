"""The Fleet front's ASGI app: the Fleet API's routes forwarded, everything else refused.

It forwards exactly ``POST /v1/fleet/<route>`` for the routes a SuperNode uses to the
SuperLink, unchanged (headers included, so SuperNode authentication, which signs each
request with the node's key, is checked by the SuperLink as before); every other method
or path gets ``404`` without reaching it. A body is forwarded only when it arrived
complete and within ``max_body`` (``413`` above it); the response streams back as the
SuperLink sends it.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx

from sepals.server.front.limits import MAX_BODY_BYTES

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The Fleet API routes of Flower 1.41 (``flwr.superlink.routers.fleet.router``), the
# only paths a SuperNode calls. A test checks this set against Flower's router.
FLEET_ROUTES = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
# Hop-by-hop headers (RFC 9110, 7.6.1) and those the forwarding client sets itself.
_DROP_REQUEST = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
    }
)
_DROP_RESPONSE = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "server",
        "date",
    }
)


class _ClientGone(Exception):
    """The client disconnected before its request's body ended."""


async def _stream(chunks: list[bytes]) -> AsyncIterator[bytes]:
    """The body's pieces, each let go once it is sent upstream."""
    while chunks:
        yield chunks.pop(0)


async def _raw(response: httpx.Response) -> AsyncIterator[bytes]:
    """The response body as the upstream sent it (content encoding untouched)."""
    if response.is_stream_consumed:  # a response made in memory, e.g. by a mock transport
        yield response.content
        return
    async for piece in response.aiter_raw():
        yield piece


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class FleetFront:
    """ASGI app forwarding the Fleet API to an upstream SuperLink and refusing the rest.

    Args:
        upstream: Base URL of the SuperLink, e.g. ``https://127.0.0.1:9093``.
        verify: TLS verification for the upstream: an ``ssl.SSLContext`` trusting the
            federation's CA, or ``False`` for a plain-HTTP upstream (``--insecure``).
        max_body: Largest request body forwarded, in bytes.
        timeout: Seconds to wait for the upstream.
        transport: An ``httpx`` transport to reach the upstream through (tests).

    """

    def __init__(
        self,
        upstream: str,
        verify: ssl.SSLContext | bool,
        max_body: int = MAX_BODY_BYTES,
        timeout: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_body < 1:
            raise ValueError(f"max_body must be >= 1, got {max_body}")
        self.upstream = upstream.rstrip("/")
        self.verify = verify
        self.max_body = max_body
        self.timeout = timeout
        self.transport = transport
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.upstream,
                verify=self.verify,
                timeout=self.timeout,
                transport=self.transport,
            )
        return self._client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets and anything else: closed without an answer
        if scope["method"] != "POST" or scope["path"] not in FLEET_ROUTES:
            await _reply(send, 404, b"not found\n")
            return
        try:
            body = await self._read_body(receive)
        except _ClientGone:
            return  # the client went away mid-body: nothing is forwarded
        if body is None:
            await _reply(send, 413, b"request body too large\n")
            return
        chunks, size = body
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.lower() not in _DROP_REQUEST
        ]
        headers.append(("content-length", str(size)))
        request = self._http().build_request(
            "POST", scope["path"], content=_stream(chunks), headers=headers
        )
        try:
            response = await self._http().send(request, stream=True)
        except httpx.HTTPError:
            await _reply(send, 502, b"federation server unavailable\n")
            return
        try:
            out_headers = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in response.headers.multi_items()
                if k.lower() not in _DROP_RESPONSE
            ]
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": out_headers,
                }
            )
            async for piece in _raw(response):
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    async def _read_body(self, receive: Receive) -> tuple[list[bytes], int] | None:
        """The body's pieces and its size, or ``None`` when it is over ``max_body``.

        Raises:
            _ClientGone: the client disconnected before the body's end.

        """
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks, size

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def aclose(self) -> None:
        """Close the connections to the upstream."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
