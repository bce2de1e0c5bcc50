"""The client SDK for edge apps: join a deployed federation from your own process.

An edge app brings a model factory, its data and a privacy budget, and calls
:func:`join_federation` (or builds an :class:`EdgeClient`) with the bundle that
``sepals provision`` wrote for it::

    from sepals.client import EdgeApp, join_federation
    from sepals.common.config import PrivacyConfig

    join_federation(
        "~/fl/clients/client-1",
        EdgeApp(model_factory=make_model, train_data=train_ds, test_data=test_ds,
                privacy=PrivacyConfig(target_epsilon=8.0)),
    )

Underneath, :class:`EdgeClient` starts Flower's ``flower-supernode`` as a child
process (TLS to the server with the bundle's CA certificate, node authentication with
the bundle's key, ``--isolation process``) and runs the sepals ClientApp *in this
process*: the SuperNode relays messages, while the data, the model and the HE secret
key stay here. Only DP-noised, encrypted updates leave, plus the plaintext metadata
listed in the README (example count, steps, epsilon).

The client logs how each global model does on its own test data
(:mod:`sepals.client.local_eval`); that stays in its log.

The privacy ledger is a file (default ``<bundle>/ledger.json``). Each round's spend is
written to it atomically before the update is handed to the SuperNode, and it is
read back on start, so a restarted client keeps composing its epsilon and refuses a
round that would exceed its budget (the server is told why). The client holds an
exclusive lock on the ledger for its lifetime: a second process on the same ledger is
refused.

The bundle holds the federation's plan. The client calibrates its noise from it and
serves only rounds signed by the operator's key that match it; any other run (another
app, another federation, a changed setting) is refused with no privacy spent.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from sepals.client.app import client_for, make_client_app
from sepals.client.bundle import ClientBundle
from sepals.client.connect import (
    FederationConnectionError,
    NodeRefusedError,
    ServerUnreachableError,
    wait_for_server,
)
from sepals.client.core import ClientRuntime
from sepals.client.edge_app import EdgeApp, build_runtime, load_edge_app
from sepals.client.local_eval import LocalEvaluation
from sepals.client.runtime_loop import RuntimeLoop
from sepals.common.files import atomic_write, require_private
from sepals.common.ledger import LedgerLock
from sepals.common.log import log
from sepals.common.procs import (
    ProcessStartError,
    flower_env,
    flwr_executable,
    free_port,
    start_child,
    stop_child,
    wait_for_port,
)
from sepals.common.protocol import ERR_PLAN_MISMATCH, FAB_NAME

_POLL_SECONDS = 0.5

__all__ = [
    "ClientBundle",
    "EdgeApp",
    "EdgeClient",
    "FederationConnectionError",
    "NodeRefusedError",
    "ServerUnreachableError",
    "join_federation",
    "load_edge_app",
]


# --------------------------------------------------------------------------- runtime
def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def edge_runtime(bundle: ClientBundle, app: EdgeApp, ledger_path: Path) -> ClientRuntime:
    """The client runtime of ``app`` joining with ``bundle``."""
    if app.train_dataset is None:
        raise ValueError(
            "an edge client needs the app's train_data (client_data is for simulations)"
        )
    return build_runtime(
        app,
        client_id=bundle.name,
        train_data=app.train_dataset,
        test_data=app.test_dataset,
        encryption=bundle.encryption,
        plan=bundle.plan,
        secret_context=bundle.read_secret_context(),
        ledger_path=ledger_path,
    )


class EdgeClient:
    """Joins a federation with a bundle and serves its rounds until stopped.

    Args:
        bundle: The client bundle (directory or loaded :class:`ClientBundle`).
        app: Model factory, data and privacy budget.
        ledger_path: The privacy ledger file (default ``<bundle>/ledger.json``).
        server_address: Override the bundle's ``host:port``.
        insecure: Connect without TLS or node authentication (only to a server started
            with ``--insecure``, for local trials).
        work_dir: Where the SuperNode's files and log go (default: a temporary directory).
        activation_timeout: Seconds to keep retrying when the server refuses the node.
        activation_retry: Seconds between those retries.
        connect_timeout: Seconds :meth:`run` waits for the server to answer before it
            gives up with :class:`ServerUnreachableError`.
        allow_insecure_permissions: Accept secret files (node key, HE secret key,
            ledger) that other users may read: for trials only.

    Raises:
        ValueError: the bundle is malformed, or the app does not fit the federation's
            plan (its model size, say).
        InsecureFileError: a secret file is readable by other users.
        LedgerLockedError: another process holds the ledger.

    The client holds the ledger's lock from construction until :meth:`close` (or the
    end of the process); use it as a context manager, or call :func:`join_federation`.

    """

    def __init__(
        self,
        bundle: ClientBundle | Path | str,
        app: EdgeApp,
        *,
        ledger_path: Path | str | None = None,
        server_address: str | None = None,
        insecure: bool = False,
        work_dir: Path | str | None = None,
        activation_timeout: float = 150.0,
        activation_retry: float = 10.0,
        connect_timeout: float = 60.0,
        allow_insecure_permissions: bool = False,
    ) -> None:
        if activation_timeout < 0 or activation_retry <= 0:
            raise ValueError("activation_timeout must be >= 0 and activation_retry > 0")
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
        self.activation_timeout = activation_timeout
        self.activation_retry = activation_retry
        self.connect_timeout = connect_timeout
        self.bundle = (
            bundle
            if isinstance(bundle, ClientBundle)
            else ClientBundle.load(bundle, allow_insecure_permissions=allow_insecure_permissions)
        )
        if app.privacy.enabled is False:
            log(WARNING, "client %s joins WITHOUT differential privacy", self.bundle.name)
        self.server_address = server_address or self.bundle.server_address
        self.insecure = insecure
        self.ledger_path = (
            Path(ledger_path) if ledger_path is not None else self.bundle.root / "ledger.json"
        )
        if self.ledger_path.exists():
            require_private(
                self.ledger_path, "privacy ledger", allow_insecure=allow_insecure_permissions
            )
        # The DP sampling, noise and rounding are drawn under fresh keys from the
        # kernel's CSPRNG (the runtime has no seed): nothing an edge app passes can
        # make them predictable.
        self.runtime = edge_runtime(self.bundle, app, self.ledger_path)
        # Load the key and check the model against the plan now, not at the first round.
        client_for(self.runtime)
        runtime = self.runtime
        self.client_app: ClientApp = make_client_app(lambda _ctx: runtime)
        self._local = LocalEvaluation(runtime)
        self._ledger_lock = LedgerLock(self.ledger_path)
        self._ledger_lock.acquire()
        self._own_work_dir = work_dir is None
        self.work_dir = (
            Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="sepals-node-"))
        )
        self._stop = threading.Event()
        self._supernode: subprocess.Popen[bytes] | None = None
        self.tasks_done = 0

    def close(self) -> None:
        """Release the ledger lock and remove an own work directory (idempotent).

        The client serves no more rounds.
        """
        self._stop.set()
        self._ledger_lock.release()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def supernode_log(self) -> Path:
        """The SuperNode's log file."""
        return self.work_dir / "supernode.log"

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current task."""
        self._stop.set()

    def _start_supernode(self, port: int, secret_file: Path) -> subprocess.Popen[bytes]:
        cmd = [
            flwr_executable("flower-supernode"),
            "--superlink",
            self.server_address,
            "--isolation",
            "process",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--superexec-auth-secret-file",
            str(secret_file),
            "--node-config",
            f'sepals-client="{self.bundle.name}"',
        ]
        if self.insecure:
            cmd.append("--insecure")
        else:
            cmd += [
                "--root-certificates",
                str(self.bundle.ca_cert),
                "--auth-supernode-private-key",
                str(self.bundle.node_key),
            ]
        env = flower_env(self.work_dir / "flwr-home")
        return start_child(cmd, env, self.supernode_log)

    def _supernode_refused(self) -> bool:
        """Whether the SuperNode exited because the server refused to activate it.

        Raises:
            FederationConnectionError: it exited for another reason.

        """
        proc = self._supernode
        if proc is None or proc.poll() is None:
            return False
        tail = _tail(self.supernode_log)
        if "[code: 2004]" in tail or "Failed to activate SuperNode" in tail:
            return True
        raise FederationConnectionError(
            f"flower-supernode exited with code {proc.returncode}:\n{tail}"
        )

    def _launch(self, port: int, secret_file: Path, timeout: float = 120.0) -> None:
        self._supernode = self._start_supernode(port, secret_file)
        try:
            wait_for_port("127.0.0.1", port, self._supernode, timeout, "flower-supernode")
        except ProcessStartError:
            if not self._supernode_refused():
                raise

    def run(self, max_tasks: int | None = None) -> int:
        """Serve the federation until :meth:`stop`, ``max_tasks`` tasks, or an error.

        If the server refuses to activate the node, the SuperNode is restarted every
        ``activation_retry`` seconds for up to ``activation_timeout`` seconds: a node
        that was killed stays marked online at the server until its heartbeat expires
        (about a minute), and a restarted client must wait that out.

        Returns:
            The number of tasks (train or evaluate messages) served.

        Raises:
            ServerUnreachableError: the server did not answer within ``connect_timeout``.
            NodeRefusedError: the server kept refusing this node (its key is not
                registered, or it is connected from another process).
            FederationConnectionError: the SuperNode failed, or the server's certificate
                is not the federation's.

        """
        secret_file = self.work_dir / "superexec.secret"
        superexec_secret = secrets.token_bytes(32)
        atomic_write(secret_file, superexec_secret, secret=True)
        port = free_port()
        log(
            INFO,
            "client %s joining %s (TLS %s, ledger %s, federation %s)",
            self.bundle.name,
            self.server_address,
            not self.insecure,
            self.ledger_path,
            self.bundle.plan.federation_id,
        )
        wait_for_server(
            self.server_address,
            None if self.insecure else self.bundle.ca_cert,
            self.connect_timeout,
        )
        self._launch(port, secret_file)
        loop = RuntimeLoop(f"127.0.0.1:{port}", superexec_secret, self._handle)
        refused_since: float | None = None
        try:
            while not self._stop.is_set():
                if self._supernode_refused():
                    now = time.monotonic()
                    refused_since = refused_since if refused_since is not None else now
                    if now - refused_since >= self.activation_timeout:
                        raise NodeRefusedError(
                            f"the server at {self.server_address} refused node "
                            f"{self.bundle.name} for {now - refused_since:.0f} s: its "
                            "authentication key is not registered there, or the node is "
                            "connected from another process"
                        )
                    log(
                        WARNING,
                        "server refused to activate node %s; retrying in %.0f s",
                        self.bundle.name,
                        self.activation_retry,
                    )
                    self._stop.wait(self.activation_retry)
                    self._launch(port, secret_file)
                    continue
                if loop.poll_once():
                    refused_since = None
                    self.tasks_done += 1
                    self._local.evaluate_pending()
                    if max_tasks is not None and self.tasks_done >= max_tasks:
                        break
                else:
                    time.sleep(_POLL_SECONDS)
        finally:
            loop.close()
            self._stop_supernode()
            if self._own_work_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)
        return self.tasks_done

    def _handle(self, message: Message, context: Context, fab_id: str) -> Message:
        # A first filter only: any publisher can name an app like ours. What makes
        # "only the operator's runs are served" true is the operator's signature on
        # every round, which the ClientApp checks before anything else.
        if not fab_id.endswith(f"/{FAB_NAME}"):
            log(WARNING, "refusing a task of app %r: this node serves only sepals", fab_id)
            return Message(Error(code=ERR_PLAN_MISMATCH, reason="foreign app"), reply_to=message)
        reply = self.client_app(message=message, context=context)
        self._local.note(message, reply)
        return reply

    def _stop_supernode(self) -> None:
        stop_child(self._supernode)


def join_federation(
    bundle: ClientBundle | Path | str,
    app: EdgeApp,
    *,
    max_tasks: int | None = None,
    **kwargs: Any,
) -> int:
    """Join the federation of ``bundle`` with ``app`` and serve it.

    Serves until ``max_tasks`` tasks (train or evaluate messages) are done, or for as
    long as the process runs. Keyword arguments go to :class:`EdgeClient`. Ctrl-C (a
    ``KeyboardInterrupt``) stops the client, which releases its ledger and stops its
    SuperNode, and then reaches the caller: the SDK never swallows the host's signals.

    Returns:
        The number of tasks served (once ``max_tasks`` are done).

    """
    with EdgeClient(bundle, app, **kwargs) as client:
        return client.run(max_tasks=max_tasks)
