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

import traceback
from collections.abc import Callable
from logging import DEBUG, WARNING

import httpx
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # type: ignore[attr-defined]
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
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
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
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
            push_message(client, reply, context)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            push_task_output(client=client, context=context, sub_status=status, details=details)
            client.close()
