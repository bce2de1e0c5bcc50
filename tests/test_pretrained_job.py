"""The public-pretraining job on every path: sepals-sim, simulate(), and Flower's apps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from sepals.common.files import checkpoint_sha256
from sepals.simulations.cli import main as sim_main
from sepals.simulations.jobs import pretrained_app
from sepals.simulations.pretrain import pretrain

pytestmark = pytest.mark.usefixtures("run_identity")


def torch_subset(data: Any, k: int, parts: int) -> Any:
    """Every ``parts``-th example of ``data``, from the ``k``-th."""
    from torch.utils.data import Subset

    return Subset(data, list(range(k, len(data), parts)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quickly pretrained backbone (one epoch of public MNIST)."""
    path = tmp_path_factory.mktemp("pretrained") / "digits-cnn.pt"
    pretrain(seed=0, out_path=path, epochs=1, augment_copies=0)
    return path


def test_the_job_is_an_edge_app_that_trains_a_part(checkpoint: Path) -> None:
    app = pretrained_app("digits", checkpoint)
    model = app.build_model_factory()()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable < total
    with pytest.raises(ValueError, match="no pretraining job"):
        pretrained_app("breast_cancer", checkpoint)
    with pytest.raises(ValueError, match="sepals pretrain"):
        pretrained_app("digits", None)


def test_sim_cli_refuses_bad_pretrained_flags(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (["--pretrained", str(tmp_path / "missing.pt")], "does not exist"),
        (["--pretrained", str(checkpoint), "--dataset", "mnist5k"], "pretraining job"),
        (["--pretrained", str(checkpoint), "--trainable", " , "], "at least one"),
        (["--pretrained", str(checkpoint), "--audit", "50", "--epsilon", "0"], "--epsilon > 0"),
    ]
    for argv, message in cases:
        assert sim_main([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_sepals_sim_fine_tunes_the_pretrained_backbone(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["--pretrained", str(checkpoint), "--rounds", "2", "--clients", "3"]
    assert sim_main([*argv, "--out", str(out), "--cpus", "2"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    model = report["config"]["model"]
    counts = model["parameters"]
    assert model["checkpoint_sha256"] == checkpoint_sha256(checkpoint)
    assert 0 < counts["trainable"] < counts["total"]
    assert f"training {counts['trainable']:,} of {counts['total']:,} parameters" in printed
    # What the checkpoint supplied: the whole frozen backbone, said on the start line.
    supplied = model["checkpoint_supplied"]
    frozen = counts["total"] - counts["trainable"]
    assert supplied["frozen_supplied"] == supplied["frozen"] == frozen
    text = f"{supplied['supplied']:,} of {counts['total']:,} parameters from the checkpoint"
    assert text in printed
    assert "kB/client" in printed
    assert report["final"]["aggregated_rounds"] == 2
    assert all(c["epsilon"] <= 8.0 for c in report["clients"])
    # Encrypted and masked: each update is one BFV payload, not fp32 weights.
    assert report["final"]["codec"].startswith("bfv")
    assert report["final"]["masking"]["rounds_masks_removed"] == 2
    # The backbone transfers: two private rounds beat chance by far.
    assert report["final"]["accuracy"] > 0.5


def _flower_contexts(run_config: dict[str, Any], nodes: list[int]) -> dict[int, Context]:
    return {
        n: Context(
            run_id=91,
            node_id=n,
            node_config={"partition-id": i, "num-partitions": len(nodes)},
            state=RecordDict(),
            run_config=run_config,
        )
        for i, n in enumerate(nodes)
    }


@pytest.mark.slow
def test_flowers_apps_run_the_pretrained_job(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flwr run . --run-config "pretrained='PATH'"``'s ServerApp and ClientApp objects."""
    from test_flower_way import FakeGrid

    from sepals.common.plan import FederationPlan
    from sepals.simulations.flwr_app import client_app, server_app

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    run_config = {"pretrained": str(checkpoint), "rounds": 1, "fraction-evaluate": 0.0}
    grid = FakeGrid(client_app, nodes=[21, 22])
    grid.contexts = _flower_contexts(run_config, grid.nodes)
    server = Context(
        run_id=91, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    server_app(grid, server)  # type: ignore[arg-type]
    plan = FederationPlan.load(tmp_path / "flwr-home" / "sepals-runs" / "91" / "plan.json")
    assert plan.checkpoint_sha256 == checkpoint_sha256(checkpoint)
    model = pretrained_app("digits", checkpoint).build_model_factory()()
    assert plan.vector_length == sum(p.numel() for p in model.parameters() if p.requires_grad)


class _Nodes:
    """A Grid whose nodes are EdgeClients' own ClientApps, in this process."""

    def __init__(self, clients: dict[int, Any], run_config: dict[str, Any]) -> None:
        self.clients = clients
        self.contexts = {
            n: Context(run_id=92, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in clients
        }
        self.run_config = run_config

    def get_node_ids(self) -> list[int]:
        return list(self.clients)

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Any]:
        return [
            self.clients[m.metadata.dst_node_id].client_app(
                message=m, context=self.contexts[m.metadata.dst_node_id]
            )
            for m in messages
        ]


@pytest.mark.slow
def test_a_deployment_fine_tunes_with_the_sdk(checkpoint: Path, tmp_path: Path) -> None:
    """Provisioned bundles, the SDK's clients and the deployed ServerApp, minus transport.

    The loopback deployment test covers TLS and the SuperLink; this one the pretrained
    path through the same objects: the plan's checkpoint digest, the clients' ledgers,
    BFV with masks, and a client with another checkpoint refused at construction.
    """
    from sepals.client.edge import EdgeClient
    from sepals.server.control.config import ServerDeployConfig
    from sepals.server.control.provision import ProvisionSpec, provision
    from sepals.server.serverapp.deployed_app import RUN_CONFIG_KEY
    from sepals.server.serverapp.deployed_app import app as deployed_app

    job = pretrained_app("digits", checkpoint)
    trainable = sum(p.numel() for p in job.build_model_factory()().parameters() if p.requires_grad)
    bundles = tmp_path / "bundles"
    provision(
        ProvisionSpec(
            out=bundles,
            clients=3,
            server_host="127.0.0.1",
            model_parameters=trainable,
            pretrained=checkpoint,
            rounds=2,
            mask_threshold=2,
        )
    )
    data = job.train_dataset
    assert data is not None
    clients = {}
    for k in range(3):
        part = torch_subset(data, k, 3)
        app = dataclasses.replace(job, train_data=part, test_data=None)
        bundle = bundles / "clients" / f"client-{k + 1}"
        clients[100 + k] = EdgeClient(bundle, app, ledger_path=tmp_path / f"ledger-{k}.json")
    try:
        # What sepals-server hands its ServerApp: the spec of the checked server.toml.
        spec = ServerDeployConfig.from_toml(bundles / "server" / "server.toml").run_spec()
        run_config = {RUN_CONFIG_KEY: str(spec.save())}
        server = Context(
            run_id=92, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
        )
        deployed_app(_Nodes(clients, run_config), server)  # type: ignore[arg-type]
    finally:
        for client in clients.values():
            client.close()
    metrics = [
        json.loads(line)
        for line in (bundles / "server" / "state" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(m["aggregated"] and m["masks_removed"] for m in metrics), metrics
    for k in range(3):
        ledger = json.loads((tmp_path / f"ledger-{k}.json").read_text())
        assert ledger["ledger"]["rounds"] == [1, 2]
    # The server's state holds ciphertexts only: no fp32 copy of the trainable part.
    state = bundles / "server" / "state"
    assert not list(state.glob("*.pt"))
