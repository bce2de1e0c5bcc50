"""The public front forwards the Fleet API and nothing else (attacks as unit tests)."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from sepals.server.front import FLEET_ROUTES, FleetFront


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
