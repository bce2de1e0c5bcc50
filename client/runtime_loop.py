"""Run ClientApp tasks in this process, against a SuperNode's Runtime API.

A Flower 1.41 SuperNode started with ``--isolation process`` does not run ClientApps
itself: an executor acquires each task from its Runtime API (HTTP on loopback), pulls
the message and context, runs the app and pushes the reply and the updated context
back. Flower's own executor (``flower-superexec``) starts one ``flwr-clientapp``
process per task, which loads the app from the FAB. :class:`RuntimeLoop` does the same
exchange in the edge app's process, so the model, the data and the secret key never
leave it. It uses the same Runtime API calls and helpers as ``flwr-clientapp``
(``flwr.supernode.runtime.run_clientapp``), and the SuperNode's SuperExec secret to
authenticate task acquisition, so no other local process can take this node's tasks.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from logging import DEBUG, WARNING

import httpx
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import (  # type: ignore[attr-defined]
    AcquireTaskRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from sepals.common.log import log

TaskHandler = Callable[[Message, Context, str], Message]
CLIENT_FAILURE = "client failure"
_ACQUIRE = frozenset({"/flwr.proto.Runtime/AcquireTask"})
# The SuperNode is busy or restarting: the heartbeat is retried (as Flower's own does).
_RETRY_STATUS = frozenset({httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT})


def task_heartbeat_fn(client: RuntimeHttpClient, refused: threading.Event) -> Callable[[], bool]:
    """A task's heartbeat that never signals this process: a refusal sets ``refused``.

    Flower's own (``flwr.supercore.heartbeat.make_task_heartbeat_fn_http``) calls
    ``signal.raise_signal(SIGINT)`` when the SuperNode refuses a heartbeat (the run
    ended, or the task expired): that ends a ``flwr-clientapp`` process, but here it
    would interrupt the edge app that embeds the SDK. This one records the refusal
    instead; the task's reply is then dropped and the loop goes on to the next task.
    Returns whether the beat went through (``False``: retried with back-off).
    """
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        if refused.is_set():
            return True  # nothing left to keep alive
        try:
            response = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in _RETRY_STATUS:
                return False
            refused.set()
            return True
        if not response.success:
            refused.set()
        return True

    return beat


class _QuietRuntimeRequests(logging.Filter):
    """Drops httpx's INFO line for each request to one local Runtime API (two a second)."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.prefix = f"http://{address}/"

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) > 1 and str(args[1]).startswith(self.prefix))


class RuntimeLoop:
    """Acquires and serves ClientApp tasks from one SuperNode.

    Args:
        address: ``host:port`` of the SuperNode's Runtime API (loopback).
        superexec_secret: The secret the SuperNode was started with.
        handler: Turns ``(message, context, fab_id)`` into the reply message.

    """

    def __init__(self, address: str, superexec_secret: bytes, handler: TaskHandler) -> None:
        self.address = address
        self.handler = handler
        # httpx logs every request at INFO; the host app keeps its own lines.
        self._quiet = _QuietRuntimeRequests(address)
        logging.getLogger("httpx").addFilter(self._quiet)
        # Polling gives up quickly, so the caller notices a SuperNode that died.
        poll_retry = make_simple_http_retry_invoker()
        poll_retry.max_tries = 2
        self._client = RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=superexec_secret, protected_methods=_ACQUIRE
                ),
            ],
            retry_invoker=poll_retry,
        )

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()
        logging.getLogger("httpx").removeFilter(self._quiet)

    def poll_once(self) -> bool:
        """Serve one pending task, if any; returns whether one was served.

        An unreachable Runtime API counts as "no task"; the caller checks the SuperNode.
        """
        try:
            res = self._client.AcquireTask(
                AcquireTaskRequest(
                    supported_task_types=[TaskType.CLIENT_APP.value], agentapp_fab_hashes=[]
                )
            )
        except (httpx.HTTPError, OSError) as exc:
            log(DEBUG, "Runtime API not reachable: %s", exc)
            return False
        if not res.HasField("task") or not res.token:
            return False
        self._serve(res.token)
        return True

    def _serve(self, token: str) -> None:
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        refused = threading.Event()
        heartbeat = HeartbeatSender(task_heartbeat_fn(client, refused))
        heartbeat.start()
        context: Context | None = None
        status, details = SubStatus.FAILED, "sepals ClientApp task failed"
        try:
            message, context, run, _fab = pull_task_input(client)
            log(DEBUG, "task of run %s: %s", run.run_id, message.metadata.message_type)
            try:
                reply = self.handler(message, context, run.fab_id)
                status, details = SubStatus.COMPLETED, ""
            except Exception:
                # The details stay in this process's log; the server gets a fixed phrase.
                log(WARNING, "ClientApp raised: %s", traceback.format_exc())
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=CLIENT_FAILURE),
                    reply_to=message,
                )
                details = CLIENT_FAILURE
            if not refused.is_set():
                push_message(client, reply, context)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            if refused.is_set():
                log(WARNING, "the SuperNode ended this task (heartbeat refused); reply dropped")
            else:
                push_task_output(client=client, context=context, sub_status=status, details=details)
            client.close()
