"""The public front forwards the Fleet API and nothing else; its limits (unit tests).

The slow and partial requests against the running front: ``test_front_attacks.py``.
"""

from __future__ import annotations

import asyncio
import logging
import math

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from sepals.server.front import FLEET_ROUTES, MAX_BODY_BYTES, FleetFront, FrontLimits
from sepals.server.front import limits as limits_module
from sepals.server.front.limits import Admission, Lineup, RefusalLog, address_key


class Upstream:
    """A fake SuperLink that records what reaches it."""

    def __init__(self) -> None:
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return httpx.Response(
            200,
            content=b"echo:" + request.content,
            headers={"content-type": "application/protobuf", "x-flwr": "1"},
        )


@pytest.fixture
def front() -> tuple[TestClient, Upstream]:
    upstream = Upstream()
    app = FleetFront(
        "https://superlink.invalid:9", False, max_body=1024, transport=httpx.MockTransport(upstream)
    )
    return TestClient(app), upstream


def test_fleet_routes_match_flower() -> None:
    from flwr.superlink.routers.fleet.router import router

    assert {r.path for r in router.routes} == set(FLEET_ROUTES)  # type: ignore[attr-defined]


def test_every_non_fleet_route_of_the_superlink_is_refused(front) -> None:  # type: ignore[no-untyped-def]
    client, upstream = front
    from flwr.supercore.routers.runtime import create_runtime_router, responses_router
    from flwr.superlink.routers.control.router import router as control

    attacked = [r.path for r in control.routes]  # type: ignore[attr-defined]
    attacked += [r.path for r in create_runtime_router("SuperLink").routes if hasattr(r, "path")]  # type: ignore[attr-defined]
    attacked += [r.path for r in responses_router.routes if hasattr(r, "path")]  # type: ignore[attr-defined]
    attacked += ["/health", "/docs", "/openapi.json", "/", "/v1/fleet", "/v1/fleet/"]
    assert len(attacked) > 40
    for path in attacked:
        for method in ("POST", "GET", "PUT", "DELETE"):
            res = client.request(method, path, content=b"x")
            assert res.status_code == 404, (method, path)
    assert upstream.seen == []


def test_fleet_requests_are_forwarded_unchanged(front) -> None:  # type: ignore[no-untyped-def]
    client, upstream = front
    for path in sorted(FLEET_ROUTES):
        res = client.post(
            path,
            content=b"\x00proto",
            headers={"content-type": "application/protobuf", "flwr-node-auth": "sig"},
        )
        assert res.status_code == 200 and res.content == b"echo:\x00proto"
        assert res.headers["x-flwr"] == "1"
        sent = upstream.seen[-1]
        assert sent.url.path == path and sent.content == b"\x00proto"
        assert sent.headers["flwr-node-auth"] == "sig"
        assert sent.url.host == "superlink.invalid"
    assert len(upstream.seen) == len(FLEET_ROUTES)
    # Only POST: the same paths with another method never reach the SuperLink.
    for path in FLEET_ROUTES:
        assert client.get(path).status_code == 404
    assert len(upstream.seen) == len(FLEET_ROUTES)


def test_oversized_body_and_dead_upstream(front) -> None:  # type: ignore[no-untyped-def]
    client, upstream = front
    assert client.post("/v1/fleet/push-object", content=b"x" * 1025).status_code == 413
    assert upstream.seen == []

    def down(_request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    dead = TestClient(FleetFront("https://x.invalid", False, transport=httpx.MockTransport(down)))
    res = dead.post("/v1/fleet/pull-messages", content=b"")
    assert res.status_code == 502 and b"refused" not in res.content


@settings(max_examples=300, deadline=None)
@given(
    path=st.one_of(
        st.text(min_size=0, max_size=60).map(lambda s: "/" + s),
        st.sampled_from(sorted(FLEET_ROUTES)).flatmap(
            lambda p: st.sampled_from(
                [p + "/", p + "/../../control/list-runs", "/" + p, p.upper(), p + "%00", p + "?x=1"]
            )
        ),
        st.sampled_from(["/v1/fleet/../control/start-run", "/v1/fleet/%2e%2e/control/stop-run"]),
    ),
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
)
def test_only_exact_fleet_posts_reach_the_superlink(path: str, method: str) -> None:
    upstream = Upstream()
    client = TestClient(
        FleetFront("https://u.invalid", False, transport=httpx.MockTransport(upstream))
    )
    try:
        res = client.request(method, path, content=b"")
    except (httpx.InvalidURL, UnicodeError, ValueError):
        return  # the client library itself refuses to send it
    for sent in upstream.seen:
        assert sent.method == "POST" and sent.url.path in FLEET_ROUTES
    if upstream.seen:
        assert res.status_code == 200
    else:
        assert res.status_code == 404


def test_a_body_cut_short_is_never_forwarded() -> None:
    """The client disconnects mid-body: nothing reaches the SuperLink, nothing is answered."""
    upstream = Upstream()
    app = FleetFront("https://u.invalid", False, transport=httpx.MockTransport(upstream))
    scope = {"type": "http", "method": "POST", "path": "/v1/fleet/push-object", "headers": []}
    messages = [
        {"type": "http.request", "body": b"x" * 100, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return messages.pop(0)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert upstream.seen == [] and sent == []


def test_front_limits_are_checked() -> None:
    assert FrontLimits().max_body_bytes == MAX_BODY_BYTES
    bad: list[dict[str, object]] = [
        {"header_timeout": 0},
        {"idle_timeout": -1.0},
        {"body_timeout": math.inf},
        {"body_timeout": math.nan},
        {"header_timeout": True},
        {"max_headers": 0},
        {"max_connections": 2.5},
        {"max_connections": True},
        {"max_header_bytes": 100},
        {"max_connections_per_address": 600},
        {"max_body_bytes": 128 * 1024 * 1024},
        {"max_buffered_bytes": 1024},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            FrontLimits(**kwargs)  # type: ignore[arg-type]


def test_front_limits_travel_as_flags() -> None:
    import argparse

    limits = FrontLimits(header_timeout=2.5, max_connections_per_address=3)
    parser = argparse.ArgumentParser()
    FrontLimits.add_arguments(parser)
    assert FrontLimits.from_args(parser.parse_args(limits.to_args())) == limits
    assert FrontLimits.from_args(parser.parse_args([])) == FrontLimits()


def test_addresses_are_counted_per_host_and_per_ipv6_network() -> None:
    assert address_key("203.0.113.7") == "203.0.113.7"
    assert address_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"


def test_admission_counts_connections_and_buffered_bytes() -> None:
    limits = FrontLimits(
        max_connections=3,
        max_connections_per_address=2,
        max_body_bytes=10,
        max_buffered_bytes=25,
        max_buffered_bytes_per_address=15,
    )
    admission = Admission(limits)
    assert admission.open("a") is None and admission.open("a") is None
    assert "per-address" in (admission.open("a") or "")
    assert not admission.full("a") and not admission.full("b")
    assert admission.open("b") is None
    assert admission.full("c") and not admission.full("a")  # "a" is at its own limit
    assert admission.open("c") == "connection limit (3) reached"
    admission.close("a")
    assert admission.open("c") is None
    assert admission.reserve("a", 10) is None
    assert "per-address" in (admission.reserve("a", 6) or "")
    assert admission.reserve("b", 15) is None
    assert not admission.room(1) and admission.reserve("c", 1) == "buffered-body limit reached"
    admission.release("a", 10)
    assert admission.room(10) and admission.reserve("c", 10) is None
    for key in ("a", "b", "c"):
        admission.release(key, {"a": 0, "b": 15, "c": 10}[key])
        admission.close(key)
    # Nothing is kept for an address that holds nothing.
    assert admission.connections == 0 and admission.buffered == 0
    assert admission._connections == {} and admission._buffered == {}


def test_the_lineup_drops_an_idle_connection_of_the_heaviest_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(limits_module.time, "monotonic", lambda: clock[0])
    dropped: list[int] = []
    line = Lineup()
    held = {"heavy": 3, "light": 1, "new": 0}
    for ident, key in ((1, "heavy"), (2, "heavy"), (3, "light"), (4, "heavy")):
        line.touch(ident, key, lambda i=ident: dropped.append(i))  # type: ignore[misc]
        clock[0] += 0.1
    # Within the grace nothing is dropped, unless asked without one (new connections).
    assert not line.drop_for("new", held.__getitem__, 1)
    assert line.drop_for("new", held.__getitem__, 1, grace=0.0) and dropped == [1]
    line.touch(1, "heavy", lambda: dropped.append(1))  # 1 is back: last in line
    clock[0] += limits_module.GRACE
    assert line.drop_for("new", held.__getitem__, 1) and dropped == [1, 2]
    # An address may not take the place of one that holds no more than it would.
    assert not line.drop_for("heavy", held.__getitem__, 1)
    held["heavy"] = 2
    assert not line.drop_for("light", held.__getitem__, 1) and dropped == [1, 2]
    # The heaviest address gives up its stalest first.
    held["light"] = 5
    assert line.drop_for("new", held.__getitem__, 1) and dropped == [1, 2, 3]
    assert len(line) == 2
    for ident in (1, 4):
        line.leave(ident)
    assert len(line) == 0 and line._lines == {}


def test_refusals_are_logged_one_line_a_second_per_kind(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr(limits_module.time, "monotonic", lambda: clock[0])
    refusals = RefusalLog()
    with caplog.at_level(logging.WARNING, logger="sepals"):
        for _ in range(500):
            refusals.note("request head too large", "192.0.2.1")
        refusals.note("request body stalled (idle deadline)", "192.0.2.2")
        clock[0] += 1.5
        refusals.note("request head too large", "192.0.2.1")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "front refused 192.0.2.1: request head too large (1 such since the last line)",
        "front refused 192.0.2.2: request body stalled (idle deadline) "
        "(1 such since the last line)",
        "front refused 192.0.2.1: request head too large (500 such since the last line)",
    ]
    assert refusals.counts["request head too large"] == 501
