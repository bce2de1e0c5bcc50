"""The edge SDK without a server: bundles, app loading and the node-config ClientApp."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from torch.utils.data import DataLoader, TensorDataset

from sepals.client.cli import main as client_main
from sepals.client.edge import ClientBundle, EdgeClient
from sepals.client.edge_app import EdgeApp, load_edge_app
from sepals.client.fab_app import _node_config_runtime
from sepals.common.config import EncryptionConfig
from sepals.common.errors import ForeignKeyError, InsecureFileError, LedgerLockedError
from sepals.common.procs import free_port
from sepals.common.protocol import ERR_PLAN_MISMATCH, KEY_CONFIG, KEY_GLOBAL, RoundConfig
from sepals.server.control.provision import ProvisionSpec, provision

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "edge_app.py"


def _example_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


def _example_app() -> EdgeApp:
    return load_edge_app(f"{EXAMPLE}:make_app", {"partition": "0", "partitions": "3"})


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("edge") / "b"
    provision(ProvisionSpec(out=out, clients=1, server_host="127.0.0.1", port=9555))
    return out


def test_bundle_loads_and_checks_its_key(bundles: Path, tmp_path: Path) -> None:
    bundle = ClientBundle.load(bundles / "clients" / "client-1")
    assert bundle.name == "client-1" and bundle.server_address == "127.0.0.1:9555"
    assert bundle.read_secret_context() is not None
    with pytest.raises(ValueError, match="not a client bundle"):
        ClientBundle.load(bundles / "server")
    # A bundle whose secret context was swapped for another federation's is caught.
    other = tmp_path / "other"
    provision(ProvisionSpec(out=other, clients=1, server_host="127.0.0.1"))
    mixed = tmp_path / "mixed"
    shutil.copytree(bundles / "clients" / "client-1", mixed)
    shutil.copy(other / "clients" / "client-1" / "he-secret.ctx", mixed / "he-secret.ctx")
    with pytest.raises(ForeignKeyError, match="bundle expects"):
        ClientBundle.load(mixed).read_secret_context()
    (mixed / "node.key").unlink()
    with pytest.raises(ValueError, match=r"lacks node\.key"):
        ClientBundle.load(mixed)


def test_load_edge_app_from_file_and_module(tmp_path: Path) -> None:
    app = load_edge_app(f"{EXAMPLE}:make_app", {"partition": "1", "partitions": "4"})
    assert isinstance(app, EdgeApp) and app.privacy.target_epsilon == 8.0
    module = tmp_path / "my_edge.py"
    module.write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from sepals.client import EdgeApp\n"
        "APP = EdgeApp(model_factory=lambda: torch.nn.Linear(2, 2),\n"
        "              train_data=TensorDataset(torch.zeros(3, 2), torch.zeros(3).long()))\n"
        "NOT_AN_APP = 3\n"
    )
    assert isinstance(load_edge_app(f"{module}:APP"), EdgeApp)
    with pytest.raises(ValueError, match="not a sepals EdgeApp"):
        load_edge_app(f"{module}:NOT_AN_APP")
    with pytest.raises(ValueError, match="no attribute"):
        load_edge_app(f"{module}:missing")
    with pytest.raises(ValueError, match="module:attr"):
        load_edge_app("no-colon")


def test_edge_app_validates_and_unwraps_loaders(bundles: Path, tmp_path: Path) -> None:
    data = TensorDataset(torch.zeros(4, 64), torch.zeros(4).long())
    with pytest.raises(ValueError, match="at least one example"):
        EdgeApp(
            model_factory=_example_model,
            train_data=TensorDataset(torch.zeros(0, 64)),
        )
    app = EdgeApp(model_factory=_example_model, train_data=DataLoader(data, batch_size=2))
    with EdgeClient(
        bundles / "clients" / "client-1", app, ledger_path=tmp_path / "l.json", work_dir=tmp_path
    ) as client:
        assert client.runtime.train_data is data, "the loader's dataset is used; DP samples"
        assert client.runtime.ledger_path == tmp_path / "l.json"
        assert client.runtime.client_id == "client-1"
        assert client.runtime.plan == ClientBundle.load(bundles / "clients" / "client-1").plan
    with pytest.raises(ValueError, match="activation"):
        EdgeClient(bundles / "clients" / "client-1", app, activation_retry=0)
    with pytest.raises(ValueError, match="connect_timeout"):
        EdgeClient(bundles / "clients" / "client-1", app, connect_timeout=0)


def test_a_model_of_another_size_is_refused_at_once(bundles: Path, tmp_path: Path) -> None:
    data = TensorDataset(torch.zeros(4, 64), torch.zeros(4).long())
    app = EdgeApp(model_factory=lambda: torch.nn.Linear(64, 10), train_data=data)
    with pytest.raises(ValueError, match="650 parameters, the federation's plan says 2410"):
        EdgeClient(bundles / "clients" / "client-1", app, ledger_path=tmp_path / "l.json")


def test_one_ledger_one_process(bundles: Path, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    bundle = bundles / "clients" / "client-1"
    with EdgeClient(bundle, _example_app(), ledger_path=ledger, work_dir=tmp_path):
        with pytest.raises(LedgerLockedError, match="in use"):
            EdgeClient(bundle, _example_app(), ledger_path=ledger, work_dir=tmp_path)
        code = client_main(
            ["--bundle", str(bundle), "--app", f"{EXAMPLE}:make_app", "--ledger", str(ledger)]
        )
        assert code == 2
    # Released on close: the next client gets it.
    EdgeClient(bundle, _example_app(), ledger_path=ledger, work_dir=tmp_path).close()


def test_secret_files_open_to_others_are_refused(
    bundles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundles / "clients" / "client-1", copy)
    for name in ("node.key", "he-secret.ctx"):
        (copy / name).chmod(0o640)
        with pytest.raises(InsecureFileError, match=f"chmod 600 {copy / name}"):
            ClientBundle.load(copy)
        args = ["--bundle", str(copy), "--app", f"{EXAMPLE}:make_app"]
        args += ["--ledger", str(tmp_path / "l.json")]
        assert client_main(args) == 2
        err = capsys.readouterr().err
        assert "chmod 600" in err and len(err.strip().splitlines()) == 1
        # Allowed for a trial, with a warning; then the (closed) server is not reached.
        port = free_port()
        trial = [*args, "--allow-insecure-permissions", "--server", f"127.0.0.1:{port}"]
        assert client_main([*trial, "--connect-timeout", "0.5"]) == 3
        assert "trials only" in capsys.readouterr().err
        (copy / name).chmod(0o600)
    ClientBundle.load(copy)


def test_unreachable_server_exits_3_within_the_timeout(
    bundles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    args = ["--bundle", str(bundles / "clients" / "client-1"), "--app", f"{EXAMPLE}:make_app"]
    args += ["--ledger", str(tmp_path / "l.json"), "--server", f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    assert client_main([*args, "--connect-timeout", "1.5"]) == 3
    took = time.monotonic() - t0
    err = capsys.readouterr().err.strip()
    assert f"cannot reach the server at 127.0.0.1:{port} within 1.5 s" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert 1.4 <= took < 30, took
    # The lock was released on the way out.
    EdgeClient(
        bundles / "clients" / "client-1", _example_app(), ledger_path=tmp_path / "l.json"
    ).close()


@pytest.mark.usefixtures("run_identity")
def test_only_the_operators_signed_rounds_are_served(bundles: Path, tmp_path: Path) -> None:
    """A run named like ours but not signed by the operator is refused, spending nothing."""
    ledger = tmp_path / "ledger.json"
    with EdgeClient(
        bundles / "clients" / "client-1", _example_app(), ledger_path=ledger, work_dir=tmp_path
    ) as client:
        plan = client.bundle.plan
        intruder = RoundConfig.for_plan(plan, 1).to_record_dict() | {"rounds": 1}
        content = RecordDict({KEY_GLOBAL: ArrayRecord(), KEY_CONFIG: ConfigRecord(intruder)})
        msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
        ctx = Context(run_id=9, node_id=1, node_config={}, state=RecordDict(), run_config={})
        for fab_id, reason in (
            ("mallory/other-app", "foreign app"),
            ("mallory/sepals-federation", "foreign federation"),
        ):
            reply = client._handle(msg, ctx, fab_id)
            assert (reply.error.code, reply.error.reason) == (ERR_PLAN_MISMATCH, reason)
        assert not ledger.exists(), "no epsilon was spent"


def _edit(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        target = meta
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return edit


_DELETE = object()
_BAD_MODULE = "raise RuntimeError('broken at import')\n"
_NOT_APP = "def make_app():\n    return 42\n"
_EXITS = "import sys\nsys.exit(3)\n"


@pytest.mark.parametrize(
    ("bundle_text", "edit", "app", "app_args", "match"),
    [
        ("{oops", None, None, [], "bundle.json is not JSON"),
        ("[1, 2]", None, None, [], "must hold a JSON object"),
        (None, _edit("name", _DELETE), None, [], "lacks 'name'"),
        (None, _edit("name", 5), None, [], "name is malformed"),
        (None, _edit("server_address", _DELETE), None, [], "lacks 'server_address'"),
        (None, _edit("role", "server"), None, [], "not a client bundle"),
        (None, _edit("encryption", _DELETE), None, [], "lacks 'encryption'"),
        (None, _edit("encryption", "bfv"), None, [], "encryption must be an object"),
        (None, _edit("encryption.poly_modulus_degree", "8192"), None, [], "poly_modulus_degree"),
        (None, _edit("encryption.coeff_mod_bit_sizes", 7), None, [], "coeff_mod_bit_sizes"),
        (None, _edit("encryption.scheme", "rsa"), None, [], "scheme"),
        (None, _edit("encryption.max_clients", 10**6), None, [], "max_clients"),
        (None, _edit("encryption.colour", 1), None, [], "colour"),
        (None, _edit("he_key_fingerprint", 5), None, [], "he_key_fingerprint"),
        (None, _edit("plan", _DELETE), None, [], "lacks 'plan'"),
        (None, _edit("plan.rounds", "two"), None, [], "plan.rounds"),
        (None, _edit("plan.federation_id", "x"), None, [], "plan.federation_id"),
        (None, _edit("plan.key_fingerprint", "0" * 32), None, [], "not the bundle's HE key"),
        (None, None, "nonexistent.module:x", [], "no module named 'nonexistent'"),
        (None, None, "BADFILE:make_app", [], "RuntimeError: broken at import"),
        (None, None, "EXITFILE:make_app", [], "SystemExit"),
        (None, None, "NOTAPP:make_app", [], "gave a int, not a sepals EdgeApp"),
        (None, None, "NOTAPP:missing", [], "has no attribute 'missing'"),
        (None, None, "EXAMPLE:make_app", ["partition=x"], "failed with partition='x'"),
        (None, None, "EXAMPLE:make_app", ["colour=red"], "unexpected keyword"),
        (None, None, "EXAMPLE:make_app", ["partition=7"], "partition must be in"),
        (None, None, "no-colon", [], "module:attr"),
        (None, None, "/nonexistent/app.py:make_app", [], "no such file"),
    ],
)
def test_bad_bundle_or_app_is_one_line_and_exit_2(
    bundles: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    bundle_text: str | None,
    edit: Callable[[dict[str, Any]], None] | None,
    app: str | None,
    app_args: list[str],
    match: str,
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles / "clients" / "client-1", bundle)
    meta_path = bundle / "bundle.json"
    if bundle_text is not None:
        meta_path.write_text(bundle_text)
    if edit is not None:
        meta = json.loads(meta_path.read_text())
        edit(meta)
        meta_path.write_text(json.dumps(meta))
    files = {"BADFILE": _BAD_MODULE, "NOTAPP": _NOT_APP, "EXITFILE": _EXITS}
    spec = app or "EXAMPLE:make_app"
    for name, text in files.items():
        if spec.startswith(name):
            path = tmp_path / f"{name.lower()}_app.py"
            path.write_text(text)
            spec = spec.replace(name, str(path))
    spec = spec.replace("EXAMPLE", str(EXAMPLE))
    args = ["--bundle", str(bundle), "--app", spec, "--ledger", str(tmp_path / "l.json")]
    args += [x for a in app_args for x in ("--app-arg", a)]
    # Should a case wrongly pass, it fails fast on a closed port instead of hanging.
    args += ["--server", f"127.0.0.1:{free_port()}", "--connect-timeout", "0.2"]
    assert client_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("sepals-client: ")


def test_node_config_client_app_finds_app_and_bundle(bundles: Path) -> None:
    empty = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="sepals-client"):
        _node_config_runtime(empty)
    cfg = {
        "sepals-app": f"{EXAMPLE}:make_app",
        "sepals-bundle": str(bundles / "clients" / "client-1"),
    }
    ctx = Context(run_id=1, node_id=1, node_config=cfg, state=RecordDict(), run_config={})  # type: ignore[arg-type]
    runtime = _node_config_runtime(ctx)
    assert runtime.client_id == "client-1"
    assert runtime.ledger_path == bundles / "clients" / "client-1" / "ledger.json"
    assert _node_config_runtime(ctx) is runtime, "built once per process"


def _tls_server(cert: Path, key: Path) -> tuple[int, Callable[[], None]]:
    """A loopback TLS listener that completes handshakes until stopped."""
    import socket
    import ssl
    import threading

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except OSError:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close() -> None:
        stop.set()
        thread.join(timeout=5)
        listener.close()

    return int(listener.getsockname()[1]), close


def test_reachability_probe_speaks_tls_and_checks_the_ca(bundles: Path, tmp_path: Path) -> None:
    from sepals.client.connect import FederationConnectionError, wait_for_server

    server = bundles / "server"
    port, close = _tls_server(server / "server.pem", server / "server.key")
    try:
        wait_for_server(f"127.0.0.1:{port}", bundles / "clients" / "client-1" / "ca.pem", 5.0)
        other = tmp_path / "other"
        none = EncryptionConfig(scheme="none")
        provision(ProvisionSpec(out=other, clients=1, server_host="127.0.0.1", encryption=none))
        with pytest.raises(FederationConnectionError, match="CA does not accept"):
            wait_for_server(f"127.0.0.1:{port}", other / "clients" / "client-1" / "ca.pem", 5.0)
    finally:
        close()
    with pytest.raises(ValueError, match="HOST:PORT"):
        wait_for_server("nohost", None, 1.0)
