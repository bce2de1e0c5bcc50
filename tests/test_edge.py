"""The edge SDK without a server: bundles, app loading and the node-config ClientApp."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from torch.utils.data import DataLoader, TensorDataset

from sepals.client.edge import (
    ClientBundle,
    EdgeApp,
    EdgeClient,
    _node_config_runtime,
    load_edge_app,
)
from sepals.common.errors import ForeignKeyError
from sepals.common.provision import ProvisionSpec, provision

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "edge_app.py"


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
            model_factory=lambda: torch.nn.Linear(64, 10),
            train_data=TensorDataset(torch.zeros(0, 64)),
        )
    app = EdgeApp(
        model_factory=lambda: torch.nn.Linear(64, 10), train_data=DataLoader(data, batch_size=2)
    )
    client = EdgeClient(
        bundles / "clients" / "client-1", app, ledger_path=tmp_path / "l.json", work_dir=tmp_path
    )
    assert client.runtime.train_data is data, "the loader's dataset is used; DP samples batches"
    assert client.runtime.ledger_path == tmp_path / "l.json"
    assert client.runtime.client_id == "client-1"
    with pytest.raises(ValueError, match="activation"):
        EdgeClient(bundles / "clients" / "client-1", app, activation_retry=0)


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
