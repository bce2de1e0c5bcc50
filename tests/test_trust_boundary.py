"""Attacks on a deployed server's trust boundary, on loopback: every one must fail.

One federation (2 clients, TLS and node authentication) is started with
``sepals-server``, its clients with it. While it runs, an outsider holding the
federation's ``ca.pem`` (and, in a second try, a valid node key) uses the real ``flwr``
CLI and Flower's own Control API client against the public address; a local user tries
the loopback SuperLink; then the operator's SIGTERM must leave no process behind.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from e2e_util import BIN, alive, client, cmdlines, descendants, metrics, spawn, stop, wait_for

from sepals.client.privacy import PrivacyLedger, compute_epsilon
from sepals.common.config import PrivacyConfig
from sepals.common.procs import free_port
from sepals.server.control.tls_keys import make_node_keys

pytestmark = pytest.mark.slow

PRIVACY = PrivacyConfig(target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0)

EVIL_APP = """
from pathlib import Path
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    Path("{marker}").write_text("the outsider's code ran on the server host")
"""


def _evil_app(root: Path, marker: Path) -> Path:
    """A Flower app (named like sepals' own) whose ServerApp leaves a marker file."""
    app = root / "evilapp"
    app.mkdir()
    (app / "evil.py").write_text(EVIL_APP.format(marker=marker))
    (app / "pyproject.toml").write_text(
        """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "sepals-federation"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "evil:app"
clientapp = "evil:app"
"""
    )
    return app


def _flwr_home(root: Path, name: str, address: str, ca: Path) -> dict[str, str]:
    home = root / f"flwr-{name}"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "{address}"\nroot-certificates = "{ca}"\n'
    )
    return {"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}


def _flwr(env: dict[str, str], *args: str) -> str:
    """Run the real ``flwr`` CLI; returns what it printed."""
    import os

    proc = subprocess.run(
        [str(BIN / "flwr"), *args],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.stdout + proc.stderr


def _refused(output: str) -> bool:
    """Whether a ``flwr ... --format json`` call failed."""
    start = output.find("{")
    try:
        doc = json.loads(output[start:])
    except ValueError:
        return "404" in output or "Error" in output
    return doc.get("success") is False


def _listeners(port: int) -> set[str]:
    """Local addresses (hex, as in ``/proc/net/tcp``) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if int(hexport, 16) == port and fields[3] == "0A":  # LISTEN
                found.add(addr)
    return found


def test_outsiders_cannot_control_the_deployment(tmp_path: Path) -> None:
    port = free_port()
    bundles = tmp_path / "bundles"
    subprocess.run(
        [
            str(BIN / "sepals"),
            "provision",
            "--out",
            str(bundles),
            "--clients",
            "2",
            "--server-host",
            "127.0.0.1",
            "--port",
            str(port),
            "--rounds",
            # More rounds than the test lets run: the clients start with the server and
            # train while the attacks go on, and the federation must still be running
            # when the operator stops it.
            "20",
        ],
        check=True,
        capture_output=True,
    )
    server_dir = bundles / "server"
    toml = server_dir / "server.toml"
    text = toml.read_text()
    for old, new in [
        (r"(?m)^round_timeout = .*", "round_timeout = 150.0"),
    ]:
        text = re.sub(old, new, text)
    toml.write_text(text)
    state = server_dir / "state"
    clients = [bundles / "clients" / f"client-{i}" for i in (1, 2)]
    ca = server_dir / "ca.pem"
    logs = tmp_path / "logs"
    logs.mkdir()
    server_log = logs / "server.log"
    all_logs = [server_log, state / "front.log", state / "serverapp.log"]
    marker = tmp_path / "PWNED"
    evil = _evil_app(tmp_path, marker)

    server = spawn([str(BIN / "sepals-server"), "--config", str(toml)], server_log)
    procs = [server]
    try:
        # The registered clients start with the server (their start-up and first round
        # overlap the attacks); each waits for the server to answer.
        procs += [
            client(c, i, 2, logs / f"client-{i + 1}.log", "--connect-timeout", "300")
            for i, c in enumerate(clients)
        ]
        wait_for(lambda: "submitted run" in server_log.read_text(), 300, "the run", all_logs)
        log_text = server_log.read_text()
        run_id = re.search(r"submitted run (\d+)", log_text).group(1)  # type: ignore[union-attr]
        internal = int(re.search(r"APIs on 127\.0\.0\.1:(\d+) only", log_text).group(1))  # type: ignore[union-attr]

        # The SuperLink (every Flower API) listens on loopback only; the public port is
        # the front's.
        assert _listeners(internal) == {"0100007F"}, _listeners(internal)
        assert _listeners(port), "nothing listens on the public port"

        # An outsider with ca.pem, through the public address, with the real flwr CLI.
        outsider = _flwr_home(tmp_path, "outsider", f"127.0.0.1:{port}", ca)
        _private, evil_pub = make_node_keys()
        (tmp_path / "evil.pub").write_bytes(evil_pub)
        attempts = {
            "ls": ["ls", "outsider", "--format", "json"],
            "log": ["log", run_id, "outsider", "--show"],
            "stop": ["stop", run_id, "outsider", "--format", "json"],
            "run": ["run", str(evil), "outsider", "--format", "json"],
            "supernode register": [
                "supernode",
                "register",
                str(tmp_path / "evil.pub"),
                "outsider",
                "--format",
                "json",
            ],
            "supernode ls": ["supernode", "ls", "outsider", "--format", "json"],
        }
        for name, args in attempts.items():
            out = _flwr(outsider, *args)
            assert _refused(out), (name, out)
            assert "404" in out, (name, out)

        # The same with a valid node key: Flower's Control API client, signing every
        # request as client-1's SuperNode does.
        from cryptography.hazmat.primitives import serialization
        from flwr.proto.control_pb2 import (  # type: ignore[attr-defined]
            ListNodesRequest,
            ListRunsRequest,
            StopRunRequest,
        )
        from flwr.supercore.control import ControlHttpClient
        from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

        key = serialization.load_ssh_private_key((clients[0] / "node.key").read_bytes(), None)
        control = ControlHttpClient.from_server_address(
            server_address=f"127.0.0.1:{port}",
            insecure=False,
            root_certificates=ca.read_bytes(),
            interceptors=[NodeAuthHttpInterceptor(key, key.public_key())],  # type: ignore[arg-type]
        )
        for call, request in (
            (control.ListRuns, ListRunsRequest()),
            (control.ListNodes, ListNodesRequest()),
            (control.StopRun, StopRunRequest(run_id=int(run_id))),
        ):
            with pytest.raises(httpx.HTTPStatusError) as info:
                call(request)
            assert info.value.response.status_code == 404
        control.close()

        # A local user on the server host: the Runtime API refuses to hand out the
        # ServerApp's task without the SuperExec secret.
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # type: ignore[attr-defined]
        from flwr.supercore.runtime import RuntimeHttpClient

        runtime = RuntimeHttpClient.from_server_address(
            server_address=f"127.0.0.1:{internal}",
            insecure=False,
            root_certificates=ca.read_bytes(),
            interceptors=[],
        )
        with pytest.raises(httpx.HTTPStatusError):
            runtime.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-serverapp"]))
        runtime.close()

        # ... and a run it submits on loopback is refused by sepals-server unexecuted.
        local = _flwr_home(tmp_path, "local", f"127.0.0.1:{internal}", ca)
        out = _flwr(local, "run", str(evil), "local", "--format", "json")
        evil_run = json.loads(out[out.find("{") :])["run-id"]

        def evil_finished() -> bool:
            runs = _flwr(local, "ls", "local", "--format", "json")
            return any(
                str(r.get("run-id")) == str(evil_run) and "finished" in str(r.get("status"))
                for r in json.loads(runs[runs.find("{") :]).get("runs", [])
            )

        wait_for(evil_finished, 120, "the foreign run to be refused", all_logs, poll=2.0)
        assert "refusing a ServerApp task of run" in (state / "server.log").read_text() + (
            server_log.read_text()
        )

        # Registered nodes still train.
        wait_for(
            lambda: len(metrics(state)) >= 1, 420, "round 1", [*all_logs, logs / "client-1.log"]
        )
        assert metrics(state)[0]["accepted"] == 2

        # No task token or secret appears in the command line of any process of this
        # federation (what `ps` shows every local user).
        server_tree = descendants(server.pid)
        ours = server_tree | {p.pid for p in procs}
        for proc in procs[1:]:
            ours |= descendants(proc.pid)
        lines = cmdlines()
        for pid, line in lines.items():
            if pid in ours or str(tmp_path) in line:
                assert "--token" not in line, line
                assert not re.search(r"[0-9a-f]{64,}", line), (pid, line)
        assert len(server_tree) >= 3, "SuperLink, front and ServerApp should all run"
        assert not (state / "superexec.secret").exists()

        # The operator stops the server mid-federation: nothing it started survives.
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) != 0
        deadline = time.monotonic() + 30
        while alive(server_tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive(server_tree), {p: cmdlines().get(p) for p in alive(server_tree)}
        assert not [
            line for line in cmdlines().values() if str(state) in line or f":{internal}" in line
        ]
    finally:
        stop(procs)

    assert not marker.exists(), "the outsider's ServerApp ran on the server host"
    # Every ledger spent only on the operator's rounds, and holds its composed epsilon.
    played = {int(m["round"]) for m in metrics(state)}  # type: ignore[call-overload]
    for bundle in clients:
        ledger = PrivacyLedger.load(bundle / "ledger.json", PRIVACY)
        assert set(ledger.rounds) <= played | {max(played) + 1}, (ledger.rounds, played)
        assert ledger.epsilon == pytest.approx(
            compute_epsilon(ledger.accountant, ledger.history, ledger.delta)
        )
