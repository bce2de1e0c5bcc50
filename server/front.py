"""The public front of a deployed server: it serves SuperNodes and nothing else.

Flower 1.41's SuperLink serves its Fleet API (SuperNodes), Control API (the ``flwr``
CLI: submit, stop and list runs, register nodes, stream logs) and Runtime API
(ServerApp processes) on one port, and its TLS asks clients for no certificate. On a
public address that lets anyone with the CA certificate control the federation.

So ``sepals-server`` binds the SuperLink to loopback and puts this front on the public
address. The front terminates TLS with the server certificate and forwards exactly the
Fleet API's routes, ``POST /v1/fleet/<route>`` for the routes a SuperNode uses, to the
SuperLink; every other method or path gets ``404`` without reaching it. Requests are
forwarded unchanged (headers included, so SuperNode authentication, which signs each
request with the node's key, is checked by the SuperLink as before); bodies larger than
:data:`MAX_BODY_BYTES` are refused with ``413``.

It is a plain ASGI application served by ``uvicorn`` (already a Flower dependency), and
forwards with ``httpx``; run it with ``python -m sepals.server.front``.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

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
# Flower chunks arrays into 5 MiB objects; leave room for protobuf framing.
MAX_BODY_BYTES = 16 * 1024 * 1024
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
        "content-length",
        "content-encoding",
        "server",
        "date",
    }
)


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
        body = await self._read_body(receive)
        if body is None:
            await _reply(send, 413, b"request body too large\n")
            return
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.lower() not in _DROP_REQUEST
        ]
        try:
            response = await self._http().post(scope["path"], content=body, headers=headers)
        except httpx.HTTPError:
            await _reply(send, 502, b"federation server unavailable\n")
            return
        out_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers.multi_items()
            if k.lower() not in _DROP_RESPONSE
        ]
        out_headers.append((b"content-length", str(len(response.content)).encode()))
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": out_headers}
        )
        await send({"type": "http.response.body", "body": response.content})

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                    self._client = None
                await send({"type": "lifespan.shutdown.complete"})
                return


def main(argv: list[str] | None = None) -> int:
    """Serve the front: ``python -m sepals.server.front --listen HOST:PORT ...``."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="sepals.server.front", description=__doc__)
    parser.add_argument("--host", required=True, help="public listen host")
    parser.add_argument("--port", type=int, required=True, help="public listen port")
    parser.add_argument("--upstream", required=True, help="SuperLink base URL (loopback)")
    parser.add_argument("--certfile", type=Path, help="TLS certificate of the public address")
    parser.add_argument("--keyfile", type=Path, help="TLS private key of the public address")
    parser.add_argument("--ca", type=Path, help="CA certificate that signs the upstream's")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP on both sides")
    args = parser.parse_args(argv)
    if args.insecure:
        verify: ssl.SSLContext | bool = False
        tls: dict[str, Any] = {}
    else:
        if not (args.certfile and args.keyfile and args.ca):
            print("sepals front: --certfile, --keyfile and --ca are required", file=sys.stderr)
            return 2
        verify = ssl.create_default_context(cafile=str(args.ca))
        tls = {"ssl_certfile": str(args.certfile), "ssl_keyfile": str(args.keyfile)}
    front = FleetFront(args.upstream, verify)
    uvicorn.run(
        front,
        host=args.host,
        port=args.port,
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
        limit_concurrency=256,
        timeout_keep_alive=30,
        **tls,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
