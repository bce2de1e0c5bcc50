"""Simulation on an existing Ray cluster (``--ray-address``).

The end-to-end test starts its own two-node cluster on loopback (a head and one worker
node, one CPU each, in a temp dir of its own), runs a tiny private simulation on it and
stops every process it started by PID: ``ray stop`` is not scoped to one cluster (it
ends every Ray process of the user), and other simulations may run Ray beside this one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_util import alive, cmdlines, descendants
from hypothesis import given
from hypothesis import strategies as st

from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.federation import FederationConfig
from sepals.common.seal_bundle import is_bfv_bundle, public_bfv_bundle
from sepals.simulations import harness, keys
from sepals.simulations.cli import main
from sepals.simulations.config import SimulationConfig
from sepals.simulations.harness import run_experiment
from sepals.simulations.ray_cluster import (
    check_reachable,
    cluster_backend_config,
    parse_ray_address,
)

START_SECONDS = 120
STOP_SECONDS = 20
# ``ray start`` replaces 127.0.0.1 by this machine's outward address (Ray's
# resolve_ip_for_localhost), and Ray then listens on every interface. Keeping the
# loopback address keeps every port of the test cluster on 127.0.0.1.
RAY_START = """
import sys
import ray._private.services as services
from ray.scripts.scripts import main
services.resolve_ip_for_localhost = lambda host: host
sys.argv = ["ray", *sys.argv[1:]]
main()
"""
# A head started with this switch off binds loopback; a worker node needs it on.
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- addresses
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:6379", ("127.0.0.1", 6379)),
        ("head-node.cluster.local:6380", ("head-node.cluster.local", 6380)),
        ("[::1]:6379", ("::1", 6379)),
        ("10.0.0.5:1", ("10.0.0.5", 1)),
    ],
)
def test_cluster_addresses_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_ray_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "auto",
        "6379",
        "127.0.0.1",
        "127.0.0.1:",
        ":6379",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "ray://127.0.0.1:10001",
        "http://head:8265",
        "999.1.1.1:6379",
        "head node:6379",
        "[not-v6]:6379",
        "::1:6379",
    ],
)
def test_malformed_cluster_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_ray_address(text)


@given(st.ip_addresses(v=4), st.integers(1, 65535))
def test_every_ipv4_address_and_port_round_trips(ip: Any, port: int) -> None:
    assert parse_ray_address(f"{ip}:{port}") == (str(ip), port)


@given(st.text(alphabet=st.characters(blacklist_characters=":"), max_size=40))
def test_text_without_a_port_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ray_address(text)


def test_config_refuses_local_cpus_or_gpus_with_a_cluster(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cluster's CPUs decide"):
        SimulationConfig(ray_address="127.0.0.1:6379", cpus=2, out=str(tmp_path))
    with pytest.raises(ValueError, match="HOST:PORT"):
        SimulationConfig(ray_address="ray://127.0.0.1:10001", out=str(tmp_path))
    config = SimulationConfig(ray_address="127.0.0.1:6379", out=str(tmp_path))
    assert config.to_dict()["ray_address"] == "127.0.0.1:6379"
    assert config.to_dict()["cpus"] is None


# --------------------------------------------------------------------------- CLI errors
def test_cli_refuses_a_malformed_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["--ray-address", "ray://head:10001", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("sepals-sim: error: ") and "HOST:PORT" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_refuses_an_unreachable_cluster_before_any_key_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _free_port()  # closed again: nothing listens there
    out = tmp_path / "run"
    rc = main(
        ["--ray-address", f"127.0.0.1:{port}", "--clients", "2", "--rounds", "1", "--out", str(out)]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(f"sepals-sim: error: cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert len(err.splitlines()) == 1
    assert not (out / "keys").exists()


def test_reachability_probe_accepts_a_listener() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}", timeout=2.0)


# --------------------------------------------------------------------------- Flower's backend
def test_flower_passes_the_address_to_ray_and_installs_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower's Ray backend hands ``init_args`` to ``ray.init`` and only disconnects at the end."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    calls: dict[str, Any] = {}
    monkeypatch.setattr(raybackend.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(raybackend.ray, "init", lambda **kw: calls.update(init=kw))
    monkeypatch.setattr(raybackend.ray, "shutdown", lambda *a, **kw: calls.update(shutdown=(a, kw)))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # Flower rewrites it
    backend = object.__new__(raybackend.RayBackend)
    backend.init_args_key = "init_args"
    backend.init_ray(cluster_backend_config("10.0.0.5:6379", log_to_driver=False))  # type: ignore[arg-type]
    init = calls["init"]
    assert init["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in init and "num_gpus" not in init
    # A runtime environment of environment variables only: no pip, conda, uv or files.
    assert set(init["runtime_env"]) == {"env_vars"}
    assert set(init["runtime_env"]["env_vars"]) == {"PYTHONPATH"}
    backend.pool = None
    backend.terminate()
    assert calls["shutdown"] == ((), {})  # ray.shutdown() disconnects a driver


# --------------------------------------------------------------------------- end to end
class LoopbackCluster:
    """A Ray head and one worker node on 127.0.0.1, one CPU each, in ``temp``."""

    def __init__(self) -> None:
        # Short: Ray's socket paths under it must fit a Unix socket name.
        self.temp = Path(tempfile.mkdtemp(prefix="sepals-ray-", dir="/tmp"))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.seen: set[int] = set()

    def _start(self, args: list[str], loopback_head: bool) -> None:
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        env[LOOPBACK_SWITCH] = "0" if loopback_head else "1"
        done = subprocess.run(
            [sys.executable, "-c", RAY_START, "start", *args, "--disable-usage-stats"],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_SECONDS,
            check=False,
        )
        self.seen |= self.processes()
        if done.returncode != 0:
            raise AssertionError(f"ray start failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def start(self) -> None:
        common = ["--num-cpus", "1", "--object-store-memory", "80000000"]
        self._start(
            [
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--include-dashboard",
                "false",
                "--dashboard-port",
                str(_free_port()),
                "--ray-client-server-port",
                str(_free_port()),
                "--dashboard-agent-listen-port",
                str(_free_port()),
                "--temp-dir",
                str(self.temp),
                *common,
            ],
            loopback_head=True,
        )
        self._start(
            [
                "--address",
                self.address,
                "--node-ip-address",
                "127.0.0.1",
                "--dashboard-agent-listen-port",
                str(_free_port()),
                *common,
            ],
            loopback_head=False,
        )

    def processes(self) -> set[int]:
        """This cluster's processes: named by its temp dir or its address, and their children."""
        me = os.getpid()
        tags = (str(self.temp), self.address)
        named = {
            pid for pid, cmd in cmdlines().items() if pid != me and any(t in cmd for t in tags)
        }
        found = set(named)
        for pid in named:
            found |= descendants(pid)
        return alive(found - {me})

    def daemons(self) -> set[int]:
        """The GCS server and the two raylets."""
        lines = cmdlines()
        return {
            p
            for p in self.processes()
            if "gcs_server" in lines.get(p, "") or "/raylet " in lines.get(p, "")
        }

    def stop(self) -> set[int]:
        """SIGTERM, then SIGKILL, every process of this cluster; return those still alive."""
        pids = self.seen | self.processes()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in alive(pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + STOP_SECONDS
            while alive(pids) and time.monotonic() < deadline:
                time.sleep(0.2)
            pids |= self.processes()
        shutil.rmtree(self.temp, ignore_errors=True)
        return alive(pids) | self.processes()


@contextlib.contextmanager
def loopback_cluster() -> Iterator[LoopbackCluster]:
    cluster = LoopbackCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.left = cluster.stop()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_simulation_on_a_two_node_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # This driver must resolve 127.0.0.1 as loopback too (see RAY_START).
    monkeypatch.setenv(LOOPBACK_SWITCH, "0")
    if "ray._private.ray_constants" in sys.modules:
        monkeypatch.setattr(sys.modules["ray._private.ray_constants"], "ENABLE_RAY_CLUSTER", False)
    seen: dict[str, Any] = {}
    make_server_codec = harness.make_server_codec

    def spy_server_codec(encryption: Any, public_context: bytes | None) -> Any:
        seen["public_context"] = public_context
        return make_server_codec(encryption, public_context)

    slots = harness.cluster_client_slots

    def spy_slots() -> int:
        seen["slots"] = slots()
        return int(seen["slots"])

    monkeypatch.setattr(harness, "make_server_codec", spy_server_codec)
    monkeypatch.setattr(harness, "cluster_client_slots", spy_slots)
    keys.read_secret.cache_clear()
    with loopback_cluster() as cluster:
        daemons = cluster.daemons()
        assert len(daemons) == 3, "a GCS server and two raylets"
        out = tmp_path / "run"
        config = SimulationConfig(
            dataset="digits",
            clients=3,
            federation=FederationConfig(rounds=1, min_train_clients=1),
            privacy=PrivacyConfig(target_epsilon=4.0),
            encryption=EncryptionConfig(),
            out=str(out),
            ray_address=cluster.address,
        )
        report = run_experiment(config)
        # The run only disconnected: the cluster it did not start still runs.
        assert alive(daemons) == daemons
    assert cluster.left == set(), f"Ray processes left behind: {sorted(cluster.left)}"  # type: ignore[attr-defined]

    assert report["config"]["ray_address"] == cluster.address
    assert seen["slots"] == 2, "Flower saw both nodes' CPUs"
    assert report["final"]["aggregated_rounds"] == 1
    (row,) = report["rounds"]
    assert row["clients_accepted"] == 3 and row["clients_excluded"] == 0
    assert row["epsilon"] is not None and 0 < row["epsilon"] <= 4.0
    assert row["mask"] is not None
    # Key separation: the server got a public context only, and this process (the
    # server's) never read the clients' key file, which the evaluator wrote 0600.
    # (Stripping the secret key from a bundle changes it exactly when it holds one.)
    public = seen["public_context"]
    assert is_bfv_bundle(public) and public_bfv_bundle(public) == public
    assert keys.read_secret.cache_info().currsize == 0
    secret_file = out / "keys" / "clients.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_bytes()
    assert public_bfv_bundle(secret) != secret
    assert public_bfv_bundle(secret) == public
