"""End to end on loopback: provisioned keys, sepals-server and edge clients as processes.

One federation of 3 rounds, with TLS, node authentication, DP and CKKS:

* round 1: three clients train; an unregistered fourth node is refused;
* round 2: client-3 is killed (SIGKILL) as the round starts, and restarted at once; the
  round completes with the other two when the SuperLink marks the dead node offline
  (its heartbeat expires); the restarted client-3 is sampled for round 3;
* between rounds 2 and 3 the server crashes and is restarted: it resumes at round 3 from
  its checkpoint, and client-3 continues its ledger.

The test waits for events, not for timeouts: the clients start with the server, and no
round waits for a node that is gone (which would cost ``round_timeout`` or
``node_wait_timeout``).

Then the state directory is searched for the secret key and for the plaintext global
model, and every ledger is checked against the accountant.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import e2e_util
import numpy as np
import pytest
from e2e_util import BIN, metrics, spawn, stop, wait_for

from sepals.client.privacy import PrivacyLedger, compute_epsilon, replace_one_epsilon_of
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.errors import MissingSecretKeyError
from sepals.common.plan import FederationPlan
from sepals.common.procs import free_port
from sepals.common.scheme import make_client_codec, make_server_codec
from sepals.server.control.tls_keys import make_node_keys
from sepals.server.serverapp.deployed_app import FAULT_EXIT_AFTER_ROUND

pytestmark = pytest.mark.slow

# The example edge app's budget (examples/edge_app.py, default epsilon).
PRIVACY = PrivacyConfig(target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0)


# Clients start with the server, which takes a while on a loaded 2-core machine.
_PATIENT = ("--connect-timeout", "300")


def _client(bundle: Path, partition: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    return e2e_util.client(bundle, partition, 3, log, *extra)


def test_deployed_federation_with_faults(tmp_path: Path) -> None:
    port = free_port()
    bundles = tmp_path / "bundles"
    subprocess.run(
        [
            str(BIN / "sepals"),
            "provision",
            "--out",
            str(bundles),
            "--clients",
            "3",
            "--server-host",
            "127.0.0.1",
            "--port",
            str(port),
            "--rounds",
            "3",
            # Masking is on (BFV's default). Three clients give each two neighbours; with
            # T = 1 a round survives the client this test kills (the default T = 2 would
            # abandon that round, as tests/test_masking_flow.py checks).
            "--mask-threshold",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    server_dir = bundles / "server"
    toml = server_dir / "server.toml"
    text = toml.read_text()
    # Federated evaluation is off by default: the server gets no per-client metric.
    assert re.search(r"(?m)^fraction_evaluate = 0\.0$", text), text
    for old, new in [
        # Generous: no round waits it out (a dead node's message fails when its
        # heartbeat expires, within a minute), and a slow CI machine needs the margin.
        (r"(?m)^round_timeout = .*", "round_timeout = 120.0"),
        (
            r"(?m)^nodes_dir = .*",
            'nodes_dir = "nodes"\nnode_wait_timeout = 300.0\nmin_available_clients = 3',
        ),
    ]:
        text = re.sub(old, new, text)
    toml.write_text(text)
    state = server_dir / "state"
    clients = [bundles / "clients" / f"client-{i}" for i in (1, 2, 3)]
    logs = tmp_path / "logs"
    logs.mkdir()
    server_log = logs / "server.log"
    all_logs = [server_log, *(logs / f"client-{i}.log" for i in (1, 2, 3))]

    # An intruder: a valid bundle except for a node key the server never registered.
    intruder = tmp_path / "intruder"
    intruder.mkdir()
    for name in ("bundle.json", "ca.pem", "he-secret.ctx"):
        (intruder / name).write_bytes((clients[0] / name).read_bytes())
    private, _public = make_node_keys()
    (intruder / "node.key").write_bytes(private)
    (intruder / "node.key").chmod(0o600)
    (intruder / "he-secret.ctx").chmod(0o600)

    crash = {FAULT_EXIT_AFTER_ROUND: "2"}
    server = spawn([str(BIN / "sepals-server"), "--config", str(toml)], server_log, env=crash)
    procs = [server]
    try:
        # The clients start with the server (their start-up overlaps its own): each
        # waits for the server to answer, and a node the server has not registered yet
        # is retried.
        procs += [
            _client(c, i, logs / f"client-{i + 1}.log", *_PATIENT) for i, c in enumerate(clients)
        ]
        bad = _client(intruder, 0, logs / "intruder.log", "--activation-timeout", "20", *_PATIENT)
        procs.append(bad)

        # Round 1 with all three. As soon as it is recorded, round 2 has started:
        # client-3 dies in it (a node polls for messages every 3 s, so it cannot have
        # replied yet), and the round must complete without it.
        wait_for(lambda: len(metrics(state)) >= 1, 420, "round 1", all_logs, poll=0.1)
        ledger3 = PrivacyLedger.load(clients[2] / "ledger.json", PRIVACY)
        procs[3].kill()
        procs[3].wait()
        eps_before_kill = ledger3.epsilon
        assert ledger3.rounds == (1,), ledger3
        assert eps_before_kill is not None and eps_before_kill > 0, ledger3
        # Client-3 comes back at once. The SuperLink refuses its node (retried every
        # 10 s) until the dead one's heartbeat has expired; that expiry also ends round
        # 2's wait for it. Round 3 is then sampled (within round 2, with round 2's
        # unmask request) among three live nodes, not two after node_wait_timeout.
        procs[3] = _client(clients[2], 2, logs / "client-3.log", *_PATIENT)

        # The intruder was refused.
        assert bad.wait(timeout=120) == 4, (logs / "intruder.log").read_text()[-2000:]
        assert "not registered" in (logs / "intruder.log").read_text()

        # The ServerApp crashes right after checkpointing round 2, before round 3
        # sends anything (a fault injected at that point, since masking sets round 3
        # up within round 2 and round 3's training would start at once).
        assert server.wait(timeout=420) != 0, server_log.read_text()[-3000:]
        round2 = metrics(state)[1]
        assert round2["round"] == 2 and round2["aggregated"] is True
        assert round2["accepted"] == 2
        assert {c["client_id"] for c in round2["clients"]} == {"client-1", "client-2"}  # type: ignore[union-attr]
        assert len(metrics(state)) == 2

        # The server is restarted; the clients reconnect.
        server = spawn([str(BIN / "sepals-server"), "--config", str(toml)], server_log)
        procs[0] = server
        assert server.wait(timeout=360) == 0, server_log.read_text()[-3000:]
    finally:
        stop(procs)

    lines = metrics(state)
    assert [m["round"] for m in lines] == [1, 2, 3], lines
    assert all(m["aggregated"] for m in lines), lines
    # Every update was masked, and the masks came off. Round 2 was set up during round 1,
    # with client-3: it dropped out after sharing, so its pairwise masks came off with
    # its mask key, rebuilt from the shares the two survivors revealed.
    assert [(m["masking"], m["masks_removed"]) for m in lines] == [(True, True)] * 3, lines
    assert [m["mask_members"] for m in lines] == [3, 3, 3], lines
    assert [(m["mask_survivors"], m["mask_dropouts"]) for m in lines] == [(3, 0), (2, 1), (3, 0)]
    assert lines[2]["accepted"] == 3, lines
    # No node was asked to evaluate, so no per-client loss, accuracy or count arrived.
    assert all(m["evaluated"] == 0 and m["federated_loss"] is None for m in lines), lines
    assert "federated evaluation off" in (state / "server.log").read_text()
    # Every round line carries the largest replace-one epsilon beside the largest epsilon.
    assert all(m["max_epsilon_replace_one"] > 0 for m in lines), lines
    assert "rounds 3..3" in (state / "server.log").read_text()

    # Every ledger holds its composed epsilon; client-3's kept growing across the restart.
    for client in clients:
        ledger = PrivacyLedger.load(client / "ledger.json", PRIVACY)
        assert ledger.epsilon == pytest.approx(
            compute_epsilon(ledger.accountant, ledger.history, ledger.delta)
        )
        assert 0 < (ledger.epsilon or 0) <= 8.0 + 1e-6, (client.name, ledger)
        assert 3 in ledger.rounds and 1 in ledger.rounds, (client.name, ledger, lines)
        assert ledger.replace_one_epsilon == replace_one_epsilon_of(
            ledger.accountant, ledger.history, ledger.delta
        )
    ledger3 = PrivacyLedger.load(clients[2] / "ledger.json", PRIVACY)
    assert ledger3.rounds[0] == 1 and ledger3.rounds[-1] == 3
    assert (ledger3.epsilon or 0) > (eps_before_kill or 0), (ledger3, eps_before_kill)
    shown = subprocess.run(
        [str(BIN / "sepals"), "ledger", "show", str(clients[2] / "ledger.json")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert f"{ledger3.epsilon:.4f}" in shown

    # The state directory holds neither the secret key nor the plaintext model.
    secret = (clients[0] / "he-secret.ctx").read_bytes()
    public = (server_dir / "he-public.ctx").read_bytes()
    secret_probes = [w for w in _windows(secret, 64, 40) if w not in public]
    assert len(secret_probes) > 10, "the secret context must differ from the public one"
    # the ring provision sized for the default model
    enc = EncryptionConfig().sized_for(FederationPlan.load(server_dir / "plan.json").vector_length)
    payload = (state / "global-model.spl").read_bytes()
    total = json.loads((state / "checkpoint.json").read_text())["weight_total"]
    weights = make_client_codec(enc, secret).decode(payload) / total
    scanned = 0
    for path in state.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            scanned += len(blob)
            assert not any(p in blob for p in secret_probes), f"{path} holds the secret key"
            assert not _holds_vector(blob, weights[:8]), f"{path} holds plaintext weights"
            assert not _holds_vector(blob, weights[-8:]), f"{path} holds plaintext weights"
    assert scanned > len(payload)
    server_codec = make_server_codec(enc, public)
    with pytest.raises(MissingSecretKeyError):
        server_codec.decode(payload)


def _windows(blob: bytes, size: int, count: int) -> list[bytes]:
    step = max(1, (len(blob) - size) // count)
    return [blob[i : i + size] for i in range(0, len(blob) - size, step)]


def _holds_vector(blob: bytes, values: np.ndarray, tol: float = 1e-4) -> bool:
    """Whether ``blob`` holds ``values`` as consecutive fp32 or fp64 numbers (any offset)."""
    for dtype in ("<f4", "<f8"):
        width = np.dtype(dtype).itemsize
        for offset in range(width):
            usable = (len(blob) - offset) // width
            if usable < len(values):
                continue
            with np.errstate(invalid="ignore", over="ignore"):
                arr = np.frombuffer(blob, dtype=dtype, count=usable, offset=offset).astype(
                    np.float64
                )
                hits = np.flatnonzero(np.abs(arr[: usable - len(values) + 1] - values[0]) < tol)
            for i in hits:
                window = arr[i : i + len(values)]
                if np.all(np.abs(window - values) < tol):
                    return True
    return False
