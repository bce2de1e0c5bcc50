"""Runs the ServerApp of the run ``sepals-server`` submitted, and nothing else.

``sepals-server`` starts the SuperLink with ``--isolation process`` and a SuperExec
secret, so the SuperLink starts no executor of its own and its Runtime API hands tasks
only to a caller that signs with that secret. :class:`ServerAppExecutor` is that caller:
it acquires ServerApp tasks from the Runtime API on loopback, runs the one that belongs
to the run it was told about in a child process (:mod:`sepals.server.control.serverapp_proc`,
token passed on standard input, never in ``argv``), and fails any other task at once
without running its code. The child dies with ``sepals-server`` and is stopped by it.

It uses Flower 1.41's Runtime API client (``flwr.supercore.runtime``), as the edge
client's :mod:`sepals.client.runtime_loop` does on the SuperNode side.
"""

from __future__ import annotations

import os
import subprocess
import sys
from logging import DEBUG, WARNING
from pathlib import Path

import httpx
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import (  # type: ignore[attr-defined]
    AcquireTaskRequest,
    PushTaskOutputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

from sepals.common.log import log
from sepals.common.procs import die_with_parent, stop_child

_ACQUIRE = frozenset({"/flwr.proto.Runtime/AcquireTask"})


class ServerAppExecutor:
    """Acquires ServerApp tasks from a SuperLink and runs only the expected run's.

    Args:
        runtime_address: ``host:port`` of the SuperLink's Runtime API (loopback).
        superexec_secret: The secret the SuperLink was started with.
        root_certificates: CA certificate of the SuperLink's TLS (``None``: insecure).
        env: Environment of the ServerApp process.
        log_path: Where the ServerApp process writes its output.

    """

    def __init__(
        self,
        runtime_address: str,
        superexec_secret: bytes,
        root_certificates: Path | None,
        env: dict[str, str],
        log_path: Path,
    ) -> None:
        self.runtime_address = runtime_address
        self.root_certificates = root_certificates
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.refused: list[int] = []
        retry = make_simple_http_retry_invoker()
        retry.max_tries = 2
        self._client = RuntimeHttpClient.from_server_address(
            server_address=runtime_address,
            insecure=root_certificates is None,
            root_certificates=None if root_certificates is None else root_certificates.read_bytes(),
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=superexec_secret, protected_methods=_ACQUIRE
                ),
            ],
            retry_invoker=retry,
        )

    @property
    def started(self) -> bool:
        """Whether the expected run's ServerApp process has been started."""
        return self.process is not None

    def poll(self, run_id: int) -> None:
        """Acquire one pending ServerApp task, if any, and run it if it is ``run_id``'s.

        A task of any other run (one this ``sepals-server`` did not submit) is marked
        failed without running a line of its code.
        """
        try:
            res = self._client.AcquireTask(
                AcquireTaskRequest(
                    supported_task_types=[TaskType.SERVER_APP.value], agentapp_fab_hashes=[]
                )
            )
        except (httpx.HTTPError, OSError) as exc:
            log(DEBUG, "Runtime API not reachable: %s", exc)
            return
        if not res.HasField("task") or not res.token:
            return
        if res.task.run_id != run_id or self.process is not None:
            log(
                WARNING,
                "refusing a ServerApp task of run %s: this server runs only run %s",
                res.task.run_id,
                run_id,
            )
            self.refused.append(int(res.task.run_id))
            self._fail(res.token)
            return
        self._start(res.token)

    def _fail(self, token: str) -> None:
        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address,
            insecure=self.root_certificates is None,
            root_certificates=(
                None if self.root_certificates is None else self.root_certificates.read_bytes()
            ),
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-serverapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        try:
            client.PushTaskOutput(
                PushTaskOutputRequest(
                    sub_status=SubStatus.FAILED, details="refused: not started by the operator"
                )
            )
        except httpx.HTTPError as exc:
            log(WARNING, "could not mark a refused task failed: %s", exc)
        finally:
            client.close()

    def _start(self, token: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "sepals.server.control.serverapp_proc",
            "--runtime-api-address",
            self.runtime_address,
            "--parent-pid",
            str(os.getpid()),
        ]
        if self.root_certificates is None:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.root_certificates)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logfile:
            self.process = subprocess.Popen(
                cmd,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )
        if self.process.stdin is not None:
            self.process.stdin.write(token.encode("ascii") + b"\n")
            self.process.stdin.close()

    def returncode(self) -> int | None:
        """The ServerApp process's exit code, ``None`` while it runs or before it starts."""
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        """Stop the ServerApp process (its whole process group) and close the client."""
        stop_child(self.process, group=True, grace=10)
        self._client.close()
