"""``sepals-server``: run a deployed federation on Flower's SuperLink.

The operator runs ``sepals-server --config server.toml``. The command

1. reads and checks the configuration, and refuses a secret HE context before anything
   starts (the server may only ever hold the public one);
2. starts Flower's ``flower-superlink`` with TLS and SuperNode authentication (both on
   unless ``--insecure``), its database in the state directory and Flower telemetry off;
3. registers every provisioned node public key (``flwr supernode register``), so that
   any other node is refused;
4. submits the sepals ServerApp as a run (``flwr run``), which resumes from the last
   checkpoint in the state directory if there is one;
5. prints one progress line per round from ``STATE/metrics.jsonl`` and stops the
   SuperLink when the run ends.

The ServerApp itself (:data:`app`) runs in the process Flower starts for it. It loads
the same configuration, writes per-round JSON-lines metrics, and checkpoints the
encrypted global model after every round (:mod:`sepals.server.state`).

Why ``flwr run`` and the SuperLink's own ServerApp process: that is Flower 1.41's
supported deployment path (the SuperLink manages runs, the database and node
registration); sepals only adds configuration, key checks and progress.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, fields
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from sepals.common.codec import UpdateCodec, make_server_codec
from sepals.common.config import EncryptionConfig, FederationConfig
from sepals.common.errors import SecretKeyExposureError, SepalsError
from sepals.common.files import atomic_write
from sepals.common.log import LOGGER, configure_cli_logging, log
from sepals.common.procs import (
    ProcessStartError,
    dial_host,
    flower_env,
    flwr_executable,
    port_open,
    start_child,
    stop_child,
    wait_for_port,
)
from sepals.common.protocol import FAB_NAME
from sepals.server.state import CheckpointError, StateDir
from sepals.server.strategy import EncryptedFedAvg, RoundRecord

RUN_CONFIG_KEY = "sepals-config"
CONNECTION = "sepals"
_SERVER_KEYS = {
    "address",
    "state_dir",
    "ca_cert",
    "server_cert",
    "server_key",
    "public_context",
    "nodes_dir",
    "node_wait_timeout",
    "min_available_clients",
}


class DeploymentError(SepalsError):
    """The server cannot be started or its run failed."""


def _resolve(base: Path, value: object, key: str) -> Path | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"[server] {key} must be a path string, got {value!r}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"[{name}] must be a table")
    return value


def _dataclass_kwargs(cls: type, table: dict[str, Any], name: str) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(
            f"unknown key(s) in [{name}]: {', '.join(unknown)}; known: {sorted(known)}"
        )
    out = dict(table)
    if "coeff_mod_bit_sizes" in out:
        out["coeff_mod_bit_sizes"] = tuple(out["coeff_mod_bit_sizes"])
    return out


@dataclass(frozen=True)
class ServerDeployConfig:
    """The contents of ``server.toml``.

    Attributes:
        source: The file this was read from.
        address: ``host:port`` the SuperLink listens on (all its APIs share the port).
        state_dir: Metrics, checkpoints, the SuperLink database and logs.
        ca_cert: TLS CA certificate.
        server_cert: TLS server certificate (its SAN must name the host clients dial).
        server_key: TLS server private key.
        public_context: The public HE context (a secret one is refused).
        nodes_dir: Directory of node public keys (``*.pub``) to register.
        node_wait_timeout: Seconds each round waits for ``min_available_clients`` nodes.
        min_available_clients: Nodes to wait for before sampling (default: the
            federation's ``min_train_clients``); sampling then proceeds with whoever is
            connected, if at least ``min_train_clients``.
        federation: Rounds, sampling, timeout and local-training settings.
        encryption: HE settings; must match the provisioned keys.
        parameters: Parameter count of the federation's model.

    """

    source: Path
    address: str
    state_dir: Path
    ca_cert: Path | None
    server_cert: Path | None
    server_key: Path | None
    public_context: Path | None
    nodes_dir: Path | None
    node_wait_timeout: float
    min_available_clients: int
    federation: FederationConfig
    encryption: EncryptionConfig
    parameters: int

    @classmethod
    def from_toml(cls, path: Path) -> ServerDeployConfig:
        """Parse and check ``path``; relative paths are relative to its directory.

        Raises:
            ValueError: a key is unknown, missing or out of range (the message names it).

        """
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from exc
        unknown = sorted(set(raw) - {"server", "federation", "encryption", "model"})
        if unknown:
            raise ValueError(f"unknown table(s) in {path}: {', '.join(unknown)}")
        base = path.resolve().parent
        server = _table(raw, "server")
        bad = sorted(set(server) - _SERVER_KEYS)
        if bad:
            raise ValueError(f"unknown key(s) in [server]: {', '.join(bad)}")
        address = str(server.get("address", "0.0.0.0:9092"))
        _split_address(address)
        state = _resolve(base, server.get("state_dir", "state"), "state_dir")
        model = _table(raw, "model")
        if set(model) - {"parameters"}:
            raise ValueError("[model] takes only 'parameters'")
        parameters = model.get("parameters")
        if not isinstance(parameters, int) or parameters < 1:
            raise ValueError(
                f"[model] parameters must be the model's parameter count (>= 1), got {parameters!r}"
            )
        wait = float(server.get("node_wait_timeout", 300.0))
        if wait <= 0:
            raise ValueError(f"[server] node_wait_timeout must be > 0, got {wait}")
        federation = FederationConfig(
            **_dataclass_kwargs(FederationConfig, _table(raw, "federation"), "federation")
        )
        available = server.get("min_available_clients", federation.min_train_clients)
        if not isinstance(available, int) or available < 1:
            raise ValueError(f"[server] min_available_clients must be >= 1, got {available!r}")
        return cls(
            source=path.resolve(),
            address=address,
            state_dir=state if state is not None else base / "state",
            ca_cert=_resolve(base, server.get("ca_cert"), "ca_cert"),
            server_cert=_resolve(base, server.get("server_cert"), "server_cert"),
            server_key=_resolve(base, server.get("server_key"), "server_key"),
            public_context=_resolve(base, server.get("public_context"), "public_context"),
            nodes_dir=_resolve(base, server.get("nodes_dir"), "nodes_dir"),
            node_wait_timeout=wait,
            min_available_clients=available,
            federation=federation,
            encryption=EncryptionConfig(
                **_dataclass_kwargs(EncryptionConfig, _table(raw, "encryption"), "encryption")
            ),
            parameters=parameters,
        )

    def codec(self) -> UpdateCodec:
        """The server codec; refuses a secret HE context.

        Raises:
            SecretKeyExposureError: the configured context holds a secret key.
            ValueError: encryption is on but no public context is configured.

        """
        public = None
        if self.encryption.scheme != "none":
            if self.public_context is None:
                raise ValueError("[server] public_context is required when encryption is on")
            try:
                public = self.public_context.read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read public_context: {exc}") from exc
        return make_server_codec(self.encryption, public)

    def node_keys(self) -> list[Path]:
        """The node public keys to register."""
        if self.nodes_dir is None:
            return []
        return sorted(self.nodes_dir.glob("*.pub"))


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"[server] address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- ServerApp
app = ServerApp()


def _attach_file_log(path: Path) -> None:
    if any(getattr(h, "baseFilename", None) == str(path) for h in LOGGER.handlers):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)


@app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """The sepals ServerApp of a deployed federation (runs in Flower's ServerApp process)."""
    source = context.run_config.get(RUN_CONFIG_KEY)
    if not isinstance(source, str) or not source:
        raise DeploymentError(f"run config lacks {RUN_CONFIG_KEY!r}: start runs with sepals-server")
    cfg = ServerDeployConfig.from_toml(Path(source))
    state = StateDir(cfg.state_dir)
    _attach_file_log(cfg.state_dir / "server.log")
    codec = cfg.codec()
    checkpoint = state.load_checkpoint(codec, cfg.parameters)
    done = checkpoint.round if checkpoint is not None else 0
    strategy = EncryptedFedAvg(
        codec=codec,
        vector_length=cfg.parameters,
        federation=cfg.federation,
        node_wait_timeout=cfg.node_wait_timeout,
        min_available_nodes=cfg.min_available_clients,
        round_offset=done,
    )
    if checkpoint is not None:
        strategy.rng.bit_generator.state = checkpoint.rng_state
        if checkpoint.payload is not None:
            strategy.latest_global = checkpoint.arrays()

    def sink(record: RoundRecord) -> None:
        state.save_checkpoint(strategy, record.round)
        state.append_metrics(record)

    strategy.on_round = sink
    remaining = cfg.federation.rounds - done
    log(
        INFO,
        "sepals ServerApp: codec %s, key %s, %s params, rounds %s..%s",
        codec.name,
        codec.fingerprint_hex,
        cfg.parameters,
        done + 1,
        cfg.federation.rounds,
    )
    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=strategy.latest_global or ArrayRecord(),
            num_rounds=remaining,
            timeout=cfg.federation.round_timeout,
        )
    state.mark_done(cfg.federation.rounds)


# --------------------------------------------------------------------------- launcher
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
serverapp = "sepals.server.deploy:app"
clientapp = "sepals.client.edge:fab_client_app"

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


class ServerLauncher:
    """Starts the SuperLink, registers nodes, submits the run and follows it."""

    def __init__(self, cfg: ServerDeployConfig, insecure: bool = False) -> None:
        self.cfg = cfg
        self.insecure = insecure
        self.state = StateDir(cfg.state_dir)
        self.flwr_home = cfg.state_dir / "flwr-home"
        self.env = flower_env(self.flwr_home)
        self.superlink: subprocess.Popen[bytes] | None = None
        self.run_id: str | None = None
        self._control_client: Any = None

    @property
    def dial_address(self) -> str:
        """``host:port`` to reach this SuperLink from this machine."""
        host, port = _split_address(self.cfg.address)
        return f"{dial_host(host)}:{port}"

    # -- checks ----------------------------------------------------------------------
    def preflight(self) -> UpdateCodec:
        """Everything that can be checked before a process starts.

        Raises:
            SecretKeyExposureError: the public context holds a secret key.
            ValueError: a TLS file or the node keys are missing.
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
        atomic_write(self.flwr_home / "config.toml", ("\n".join(lines) + "\n").encode())

    def start_superlink(self) -> None:
        """Start ``flower-superlink`` and wait until it accepts connections."""
        host, port = _split_address(self.cfg.address)
        cmd = [
            flwr_executable("flower-superlink"),
            "--host",
            host,
            "--port",
            str(port),
            "--database",
            str(self.cfg.state_dir / "superlink.db"),
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
        # A SuperLink of a previous (killed) server may still be shutting down.
        deadline = time.monotonic() + 30.0
        while port_open(host, port):
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"port {port} is in use (another sepals-server or SuperLink?)"
                )
            time.sleep(0.5)
        self.superlink = start_child(
            cmd, self.env, self.cfg.state_dir / "superlink.log", new_session=True
        )
        try:
            wait_for_port(host, port, self.superlink, 120.0, "flower-superlink")
        except ProcessStartError as exc:
            raise DeploymentError(f"{exc}; see {self.cfg.state_dir / 'superlink.log'}") from exc
        log(INFO, "SuperLink listening on %s (TLS %s)", self.cfg.address, not self.insecure)

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
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

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

    def register_nodes(self) -> int:
        """Register every provisioned node key; already-registered keys are fine."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.proto.control_pb2 import RegisterNodeRequest  # type: ignore[attr-defined]
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        count = 0
        control = self._control()
        for pub in self.cfg.node_keys():
            try:
                key = serialization.load_ssh_public_key(pub.read_bytes())
            except (OSError, ValueError) as exc:
                raise DeploymentError(f"cannot read node key {pub}: {exc}") from exc
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise DeploymentError(f"{pub} is not an EC public key (sepals provision)")
            request = RegisterNodeRequest(public_key=public_key_to_bytes(key), name=pub.stem)
            try:
                res = control.RegisterNode(request=request)
                log(INFO, "registered node %s as %s", pub.stem, res.node_id)
            except Exception as exc:
                detail = _http_error_text(exc)
                if "already in use" not in detail:
                    raise DeploymentError(f"cannot register {pub}: {detail}") from exc
                log(INFO, "node %s was already registered", pub.stem)
            count += 1
        return count

    def submit(self) -> str:
        """Submit the sepals ServerApp as a Flower run; returns the run id."""
        app_dir = _app_dir(self.cfg.state_dir)
        res = self._flwr(
            "run",
            str(app_dir),
            CONNECTION,
            "--run-config",
            f'{RUN_CONFIG_KEY}="{self.cfg.source}"',
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
        from flwr.proto.control_pb2 import ListRunsRequest  # type: ignore[attr-defined]

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

    def follow(self, poll: float = 1.0, status_every: float = 3.0) -> int:
        """Print each finished round until the run ends; returns the process exit code."""
        seen = len(self.state.read_metrics())
        last_status = time.monotonic()
        while True:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise DeploymentError(
                    f"flower-superlink exited ({self.superlink.returncode}); see "
                    f"{self.cfg.state_dir / 'superlink.log'}"
                )
            lines = self.state.read_metrics()
            for line in lines[seen:]:
                print(progress_line(line, self.cfg.federation.rounds), flush=True)
            seen = len(lines)
            if time.monotonic() - last_status > status_every:
                last_status = time.monotonic()
                status, details = self.run_status()
                if status.startswith("finished"):
                    for line in self.state.read_metrics()[seen:]:
                        print(progress_line(line, self.cfg.federation.rounds), flush=True)
                    if status != "finished:completed":
                        log(WARNING, "run %s ended %s: %s", self.run_id, status, details)
                        return 1
                    return 0
            time.sleep(poll)

    def stop(self) -> None:
        """Stop the SuperLink (and with it the ServerApp process)."""
        if self._control_client is not None:
            self._control_client.close()
            self._control_client = None
        stop_child(self.superlink, group=True)


def progress_line(line: dict[str, Any], rounds: int) -> str:
    """One human-readable line for a metrics record."""
    eps = line.get("max_epsilon")
    acc = line.get("federated_accuracy")
    missing = int(line.get("sampled", 0)) - int(line.get("replied", 0))
    return (
        f"round {line['round']}/{rounds}: {line.get('accepted', 0)} of "
        f"{line.get('sampled', 0)} updates aggregated"
        f"{'' if line.get('aggregated') else ' (global model unchanged)'}, "
        f"{len(line.get('declined', []))} declined, {len(line.get('excluded', []))} excluded, "
        f"{missing} missing | max eps {'-' if eps is None else f'{eps:.3f}'} | "
        f"federated acc {'-' if acc is None else f'{100 * acc:.2f}%'} | "
        f"{line.get('train_seconds', 0.0):.1f} s"
    )


_INSECURE_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! sepals-server --insecure: NO TLS and NO node authentication.                      !!
!! Anyone who can reach this port can join the federation or read its traffic.       !!
!! Use this only for local trials on a machine you control.                          !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sepals-server``."""
    parser = argparse.ArgumentParser(
        prog="sepals-server",
        description="Run a sepals federation server (Flower SuperLink + sepals ServerApp).",
    )
    parser.add_argument("--config", type=Path, required=True, help="server.toml")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no node authentication (local trials only; prints a warning)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    configure_cli_logging(args.verbose)
    try:
        cfg = ServerDeployConfig.from_toml(args.config)
    except ValueError as exc:
        print(f"sepals-server: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.insecure:
        print(_INSECURE_WARNING, file=sys.stderr, flush=True)
    launcher = ServerLauncher(cfg, insecure=args.insecure)
    try:
        launcher.preflight()
    except SecretKeyExposureError as exc:
        print(f"sepals-server: refusing to start: {exc}", file=sys.stderr)
        return 3
    except (ValueError, CheckpointError) as exc:
        print(f"sepals-server: {exc}", file=sys.stderr)
        return 2
    if launcher.state.done_rounds() == cfg.federation.rounds:
        print(f"sepals-server: all {cfg.federation.rounds} rounds are already done", flush=True)
        return 0

    def _terminate(signum: int, _frame: object) -> None:
        launcher.stop()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        launcher.start_superlink()
        launcher.register_nodes()
        launcher.submit()
        return launcher.follow()
    except DeploymentError as exc:
        print(f"sepals-server: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        launcher.stop()


if __name__ == "__main__":
    raise SystemExit(main())
