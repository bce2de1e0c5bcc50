"""The edge SDK keeps to itself in its host's process: no signals raised or swallowed, no
chatter in the host's log.

The SDK runs Flower's task protocol inside the edge app's own process. Flower's task
heartbeat answers a refused heartbeat with ``signal.raise_signal(SIGINT)`` (it ends a
``flwr-clientapp`` process); run in the host process, that is a KeyboardInterrupt at an
arbitrary line of the host app. Here the Runtime API is a fake that refuses every
heartbeat, and the host's SIGINT handler must never fire.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.proto.runtime_pb2 import SendTaskHeartbeatResponse  # type: ignore[attr-defined]

import sepals.client.edge as edge
import sepals.client.runtime_loop as runtime_loop


class FakeRuntimeClient:
    """A Runtime API client whose every heartbeat is refused (the run has ended)."""

    def __init__(self) -> None:
        self.beats = 0

    def SendTaskHeartbeat(self, _request: Any) -> Any:
        self.beats += 1
        return SendTaskHeartbeatResponse(success=False)

    def close(self) -> None:
        pass


def test_a_refused_heartbeat_never_signals_the_host_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeRuntimeClient()
    monkeypatch.setattr(
        runtime_loop.RuntimeHttpClient, "from_server_address", staticmethod(lambda **_k: fake)
    )
    pushed: list[str] = []
    message = SimpleNamespace(metadata=SimpleNamespace(message_type="train"))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    run = SimpleNamespace(run_id=1, fab_id="sepals/sepals")
    monkeypatch.setattr(runtime_loop, "pull_task_input", lambda _c: (message, context, run, None))
    monkeypatch.setattr(runtime_loop, "push_message", lambda *_a, **_k: pushed.append("reply"))
    monkeypatch.setattr(runtime_loop, "push_task_output", lambda *_a, **_k: pushed.append("output"))

    def handler(msg: Message, _ctx: Context, _fab: str) -> Any:
        # The task runs while the heartbeat is refused, as a long training round would.
        deadline = time.monotonic() + 10
        while fake.beats == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # time for a signal to reach this (the main) thread
        return SimpleNamespace(reply_to=msg)

    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        loop = runtime_loop.RuntimeLoop("127.0.0.1:1", b"secret", handler)
        loop._serve("token")
        time.sleep(0.2)
        loop.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert fake.beats >= 1
    assert received == [], "the SDK raised SIGINT in its host process"
    assert pushed == []  # the task had ended: its reply is dropped, not pushed


def test_the_heartbeat_retries_a_busy_supernode_and_stops_on_refusal() -> None:
    refused = threading.Event()
    answers: list[Any] = [
        httpx.ConnectError("down"),
        httpx.HTTPStatusError(
            "busy", request=httpx.Request("POST", "http://x"), response=httpx.Response(503)
        ),
        SendTaskHeartbeatResponse(success=True),
        SendTaskHeartbeatResponse(success=False),
    ]

    class Client:
        def SendTaskHeartbeat(self, _request: Any) -> Any:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    beat = runtime_loop.task_heartbeat_fn(Client(), refused)  # type: ignore[arg-type]
    assert [beat(), beat(), beat()] == [False, False, True]
    assert not refused.is_set()
    assert beat() is True and refused.is_set()
    assert beat() is True and answers == []  # no more calls once refused


def test_runtime_api_requests_stay_out_of_the_hosts_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(
        runtime_loop.RuntimeHttpClient,
        "from_server_address",
        staticmethod(lambda **_k: FakeRuntimeClient()),
    )
    httpx_logger = logging.getLogger("httpx")
    line = 'HTTP Request: %s %s "%s %d %s"'
    with caplog.at_level(logging.INFO, logger="httpx"):
        loop = runtime_loop.RuntimeLoop("127.0.0.1:4321", b"secret", lambda *_a: None)  # type: ignore[arg-type,return-value]
        httpx_logger.info(line, "POST", "http://127.0.0.1:4321/x", "HTTP/1.1", 200, "OK")
        httpx_logger.info(line, "GET", "https://example.org/", "HTTP/1.1", 200, "OK")
        loop.close()
        httpx_logger.info(line, "POST", "http://127.0.0.1:4321/x", "HTTP/1.1", 200, "OK")
    urls = [str(r.args[1]) for r in caplog.records if r.name == "httpx"]  # type: ignore[index]
    # The host's own request is logged, and the SDK's filter leaves with the loop.
    assert urls == ["https://example.org/", "http://127.0.0.1:4321/x"]


def test_join_federation_lets_ctrl_c_reach_the_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    closed: list[bool] = []

    class Client:
        tasks_done = 3

        def __init__(self, *_a: Any, **_k: Any) -> None:
            pass

        def __enter__(self) -> Client:
            return self

        def __exit__(self, *_exc: object) -> None:
            closed.append(True)

        def run(self, max_tasks: int | None = None) -> int:
            raise KeyboardInterrupt

    monkeypatch.setattr(edge, "EdgeClient", Client)
    with pytest.raises(KeyboardInterrupt):
        edge.join_federation(tmp_path, object())  # type: ignore[arg-type]
    assert closed == [True]  # the client cleaned up before the interrupt went on
