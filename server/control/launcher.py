"""Starts and supervises the processes of a deployed sepals server.

:class:`ServerLauncher` starts Flower's SuperLink, registers the provisioned node keys,
submits the sepals ServerApp as a run, follows its progress and stops everything.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
from flwr.proto.control_pb2 import (  # type: ignore[attr-defined]
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from sepals.common.accounting import epsilon_pair
from sepals.common.codec import UpdateCodec
from sepals.common.fairness import format_spread
from sepals.common.files import atomic_write
from sepals.common.log import log
from sepals.common.procs import (
    ProcessStartError,
    flower_env,
    flwr_executable,
    free_port,
    port_open,
    start_child,
    stop_child,
    wait_for_port,
)
from sepals.common.protocol import FAB_NAME
from sepals.server.control.config import ServerDeployConfig, split_address
from sepals.server.control.executor import ServerAppExecutor
from sepals.server.nodes import NODES_FILE
from sepals.server.serverapp.deployed_app import RUN_CONFIG_KEY, DeploymentError
from sepals.server.serverapp.state import StateDir

CONNECTION = "sepals"


def _app_dir(state: Path) -> Path:
    """A minimal Flower app whose components are the installed sepals apps."""
    app_dir = state / "flwr-app"
    pyproject = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{FAB_NAME}"
version = "1.0.0"
description = "sepals encrypted, differentially private federation"
dependencies = []

[tool.flwr.app]
publisher = "sepals"

[tool.flwr.app.components]
serverapp = "sepals.server.serverapp.deployed_app:app"
clientapp = "sepals.client.fab_app:fab_client_app"

[tool.flwr.app.config]
{RUN_CONFIG_KEY} = ""
"""
    atomic_write(app_dir / "pyproject.toml", pyproject.encode())
    atomic_write(
        app_dir / "sepals_federation.py",
        b'"""Marker module: the apps live in the installed sepals package."""\n',
    )
    return app_dir


def _http_error_text(exc: Exception) -> str:
    """The server's explanation inside an HTTP error, else the exception text."""
    response = getattr(exc, "response", None)
    text = getattr(response, "text", None)
    return f"{exc}: {text}" if text else str(exc)


SUPEREXEC_SECRET_FILE = "superexec.secret"


class ServerLauncher:
    """Starts the server's processes, registers nodes, submits the run and follows it.

    What listens where (see ``docs/deploy.md``):

    * the configured public ``address``: the Fleet front (:mod:`sepals.server.front`),
      TLS with the server certificate, forwarding only the Fleet API;
    * ``127.0.0.1:<free port>``: the SuperLink (all of Flower's APIs, TLS with the same
      certificate, SuperNode authentication, Runtime API behind a SuperExec secret);
    * no listener: the ServerApp process, which this launcher starts for its own run
      only (:mod:`sepals.server.control.executor`).
    """

    def __init__(self, cfg: ServerDeployConfig, insecure: bool = False) -> None:
        self.cfg = cfg
        self.insecure = insecure
        self.state = StateDir(cfg.state_dir)
        self.flwr_home = cfg.state_dir / "flwr-home"
        self.env = flower_env(self.flwr_home)
        self.internal_port = free_port()
        self.superlink: subprocess.Popen[bytes] | None = None
        self.front: subprocess.Popen[bytes] | None = None
        self.executor: ServerAppExecutor | None = None
        self.run_id: str | None = None
        self._superexec_secret = secrets.token_bytes(32)
        self._control_client: Any = None

    @property
    def dial_address(self) -> str:
        """``host:port`` of the SuperLink on loopback (Control and Runtime APIs)."""
        return f"127.0.0.1:{self.internal_port}"

    # -- checks ----------------------------------------------------------------------
    def preflight(self) -> UpdateCodec:
        """Everything that can be checked before a process starts.

        Raises:
            SecretKeyExposureError: the public context holds a secret key.
            ValueError: a TLS file or the node keys are missing, or the configuration
                departs from the federation's plan.
            CheckpointError: the state directory belongs to another federation.

        """
        codec = self.cfg.codec()
        if not self.insecure:
            for key in ("ca_cert", "server_cert", "server_key"):
                path = getattr(self.cfg, key)
                if path is None or not path.is_file():
                    raise ValueError(
                        f"[server] {key} is required with TLS (missing: {path}); "
                        "use --insecure only for local trials"
                    )
            if not self.cfg.node_keys():
                raise ValueError(
                    f"no node public keys (*.pub) in [server] nodes_dir {self.cfg.nodes_dir}; "
                    "node authentication would refuse every client"
                )
        self.cfg.signer(codec)
        self.state.load_checkpoint(codec, self.cfg.parameters)
        return codec

    # -- processes -------------------------------------------------------------------
    def _connection_toml(self) -> None:
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "{self.dial_address}"',
        ]
        if self.insecure:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.cfg.ca_cert}"')
        atomic_write(
            self.flwr_home / "config.toml", ("\n".join(lines) + "\n").encode(), secret=True
        )

    def start(self) -> None:
        """Start the SuperLink on loopback, then the public front; wait for both."""
        host, port = split_address(self.cfg.address)
        # A previous (killed) server may still be shutting down.
        deadline = time.monotonic() + 30.0
        while port_open(host, port):
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"port {port} is in use (another sepals-server or SuperLink?)"
                )
            time.sleep(0.5)
        self._start_superlink()
        self._start_front(host, port)
        log(
            INFO,
            "serving SuperNodes on %s (TLS %s); Control and Runtime APIs on %s only",
            self.cfg.address,
            not self.insecure,
            self.dial_address,
        )

    def _start_superlink(self) -> None:
        secret_file = self.cfg.state_dir / SUPEREXEC_SECRET_FILE
        atomic_write(secret_file, self._superexec_secret, secret=True)
        cmd = [
            flwr_executable("flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.internal_port),
            "--database",
            str(self.cfg.state_dir / "superlink.db"),
            "--isolation",
            "process",
            "--superexec-auth-secret-file",
            str(secret_file),
            "--disable-runtime-dependency-installation",
        ]
        if self.insecure:
            cmd.append("--insecure")
        else:
            cmd += [
                "--ssl-certfile",
                str(self.cfg.server_cert),
                "--ssl-keyfile",
                str(self.cfg.server_key),
                "--ssl-ca-certfile",
                str(self.cfg.ca_cert),
                "--enable-supernode-auth",
            ]
        self._connection_toml()
        self.superlink = start_child(
            cmd, self.env, self.cfg.state_dir / "superlink.log", new_session=True
        )
        try:
            wait_for_port("127.0.0.1", self.internal_port, self.superlink, 120.0, "SuperLink")
        except ProcessStartError as exc:
            raise DeploymentError(f"{exc}; see {self.cfg.state_dir / 'superlink.log'}") from exc
        finally:
            # The SuperLink has read the secret (or failed); it stays only in memory.
            secret_file.unlink(missing_ok=True)
        self.executor = ServerAppExecutor(
            self.dial_address,
            self._superexec_secret,
            None if self.insecure else self.cfg.ca_cert,
            self.env,
            self.cfg.state_dir / "serverapp.log",
        )

    def _start_front(self, host: str, port: int) -> None:
        scheme = "http" if self.insecure else "https"
        cmd = [
            sys.executable,
            "-m",
            "sepals.server.front",
            "--host",
            host,
            "--port",
            str(port),
            "--upstream",
            f"{scheme}://{self.dial_address}",
            *self.cfg.front.to_args(),
        ]
        if self.insecure:
            cmd.append("--insecure")
        else:
            cmd += [
                "--certfile",
                str(self.cfg.server_cert),
                "--keyfile",
                str(self.cfg.server_key),
                "--ca",
                str(self.cfg.ca_cert),
            ]
        self.front = start_child(cmd, self.env, self.cfg.state_dir / "front.log", new_session=True)
        try:
            wait_for_port(host, port, self.front, 60.0, "the Fleet front")
        except ProcessStartError as exc:
            raise DeploymentError(f"{exc}; see {self.cfg.state_dir / 'front.log'}") from exc

    def _flwr(self, *args: str) -> dict[str, Any]:
        cmd = [flwr_executable("flwr"), *args, "--format", "json"]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=False)
        try:
            out: dict[str, Any] = json.loads(proc.stdout)
        except ValueError as exc:
            raise DeploymentError(
                f"`flwr {' '.join(args)}` failed ({proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-500:]}"
            ) from exc
        return out

    def _control(self) -> Any:
        """The HTTP client of the SuperLink's Control API (what the ``flwr`` CLI uses).

        Made once per SuperLink and closed by :meth:`stop`.
        """
        if self._control_client is not None:
            return self._control_client
        self._control_client = ControlHttpClient.from_server_address(
            server_address=self.dial_address,
            insecure=self.insecure,
            root_certificates=None if self.insecure else self.cfg.ca_cert.read_bytes(),  # type: ignore[union-attr]
            interceptors=[
                CliClientHttpInterceptor(),
                RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
            ],
        )
        return self._control_client

    def register_nodes(self) -> dict[int, str]:
        """Register every provisioned node key (already-registered keys are fine).

        Writes ``STATE/nodes.json``, the node id -> client name map the ServerApp uses
        to name (and cap) each node by its authenticated key, never by what it claims.
        With ``--insecure`` (no node authentication) the map is empty and nothing is
        registered.

        Returns:
            That map.

        """
        if self.insecure:
            # Without node authentication SuperNodes register themselves under fresh
            # ids, so no key can be mapped: the ServerApp names nodes by id.
            atomic_write(self.cfg.state_dir / NODES_FILE, b"{}", secret=True)
            return {}
        control = self._control()
        wanted: dict[bytes, str] = {}
        for pub in self.cfg.node_keys():
            try:
                key = serialization.load_ssh_public_key(pub.read_bytes())
            except (OSError, ValueError) as exc:
                raise DeploymentError(f"cannot read node key {pub}: {exc}") from exc
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise DeploymentError(f"{pub} is not an EC public key (sepals provision)")
            raw = public_key_to_bytes(key)
            wanted[raw] = pub.stem
            try:
                control.RegisterNode(request=RegisterNodeRequest(public_key=raw, name=pub.stem))
                log(INFO, "registered node %s", pub.stem)
            except Exception as exc:
                detail = _http_error_text(exc)
                if "already in use" not in detail:
                    raise DeploymentError(f"cannot register {pub}: {detail}") from exc
                log(INFO, "node %s was already registered", pub.stem)
        names: dict[int, str] = {}
        for node in control.ListNodes(ListNodesRequest()).nodes_info:
            name = wanted.get(bytes(node.public_key))
            if name is not None and not node.unregistered_at:
                names[int(node.node_id)] = name
        missing = sorted(set(wanted.values()) - set(names.values()))
        if missing:
            raise DeploymentError(f"the SuperLink does not list node(s) {', '.join(missing)}")
        atomic_write(
            self.cfg.state_dir / NODES_FILE,
            json.dumps({str(k): v for k, v in sorted(names.items())}, indent=2).encode(),
            secret=True,
        )
        return names

    def submit(self) -> str:
        """Submit the sepals ServerApp as a Flower run; returns the run id."""
        app_dir = _app_dir(self.cfg.state_dir)
        res = self._flwr(
            "run",
            str(app_dir),
            CONNECTION,
            "--run-config",
            f'{RUN_CONFIG_KEY}="{self.cfg.run_spec().save()}"',
        )
        if not res.get("success"):
            raise DeploymentError(f"flwr run failed: {res.get('error-message')}")
        self.run_id = str(res["run-id"])
        log(INFO, "submitted run %s", self.run_id)
        return self.run_id

    def run_status(self) -> tuple[str, str]:
        """``(status, details)`` of the submitted run, e.g. ``finished:completed``."""
        if self.run_id is None:
            return "unknown", ""
        try:
            res = self._control().ListRuns(ListRunsRequest(run_id=int(self.run_id)))
        except Exception as exc:
            return "unknown", str(exc)
        for run in res.run_dict.values():
            status = run.status.status
            if run.status.sub_status:
                status = f"{status}:{run.status.sub_status}"
            return status, run.status.details
        return "unknown", ""

    def _check_children(self) -> None:
        for proc, what, log_name in (
            (self.superlink, "the SuperLink", "superlink.log"),
            (self.front, "the Fleet front", "front.log"),
        ):
            if proc is not None and proc.poll() is not None:
                raise DeploymentError(
                    f"{what} exited ({proc.returncode}); see {self.cfg.state_dir / log_name}"
                )

    def follow(self, poll: float = 1.0, status_every: float = 3.0) -> int:
        """Run the ServerApp and print each finished round until the run ends.

        Returns:
            The process exit code: 0 when the run completed.

        """
        if self.run_id is None or self.executor is None:
            raise DeploymentError("follow() needs a started SuperLink and a submitted run")
        seen = len(self.state.read_metrics())
        last_status = time.monotonic()
        while True:
            self._check_children()
            # Also after our ServerApp started: any other run's task is refused at once.
            self.executor.poll(int(self.run_id))
            lines = self.state.read_metrics()
            for line in lines[seen:]:
                print(progress_line(line, self.cfg.federation.rounds), flush=True)
            seen = len(lines)
            # A ServerApp process that died (a crash, a kill) ends the run now; the
            # SuperLink would only mark it failed when its heartbeat expires, a minute on.
            exited = self.executor.returncode()
            crashed = exited not in (None, 0)
            if time.monotonic() - last_status > status_every or crashed:
                last_status = time.monotonic()
                status, details = self.run_status()
                finished = status.startswith("finished")
                if finished or crashed:
                    for line in self.state.read_metrics()[seen:]:
                        print(progress_line(line, self.cfg.federation.rounds), flush=True)
                    if status == "finished:completed":
                        return 0
                    if finished:
                        log(WARNING, "run %s ended %s: %s", self.run_id, status, details)
                    else:
                        log(
                            WARNING,
                            "run %s: the ServerApp exited with code %s",
                            self.run_id,
                            exited,
                        )
                    return 1
            time.sleep(poll)

    def stop(self) -> None:
        """Stop every process this launcher started: ServerApp, front, SuperLink."""
        if self.executor is not None:
            self.executor.stop()
            self.executor = None
        if self._control_client is not None:
            self._control_client.close()
            self._control_client = None
        stop_child(self.front, group=True)
        stop_child(self.superlink, group=True)


def progress_line(line: dict[str, Any], rounds: int) -> str:
    """One human-readable line for a metrics record."""
    eps = line.get("max_epsilon")
    eps_r1 = line.get("max_epsilon_replace_one")
    acc = line.get("federated_accuracy")
    missing = int(line.get("sampled", 0)) - int(line.get("replied", 0))
    return (
        f"round {line['round']}/{rounds}: {line.get('accepted', 0)} of "
        f"{line.get('sampled', 0)} updates aggregated"
        f"{'' if line.get('aggregated') else ' (global model unchanged)'}, "
        f"{len(line.get('declined', []))} declined, {len(line.get('excluded', []))} excluded, "
        f"{missing} missing | max eps {'-' if eps is None else epsilon_pair(eps, eps_r1)} | "
        f"federated acc {'-' if acc is None else f'{100 * acc:.2f}%'} | "
        f"{_spread_part(line)}{line.get('train_seconds', 0.0):.1f} s{_clamped_part(line)}"
        + (f" | REJECTED: {line['rejected']}" if line.get("rejected") else "")
    )


def _clamped_part(line: dict[str, Any]) -> str:
    """`` | 12 values clamped to update_bound (raise it)`` when any client clamped."""
    clamped = sum(int(c.get("clamped_values", 0)) for c in line.get("clients", []))
    return f" | {clamped} values clamped to update_bound (raise it)" if clamped else ""


def _spread_part(line: dict[str, Any]) -> str:
    """The spread of the clients' federated evaluation metric, as ``clients min ... | ``."""
    name = "accuracy" if line.get("federated_accuracy") is not None else "metric"
    text = format_spread(line.get("federated_spread"), name)
    return f"{text} | " if text else ""
