"""A deployed client shows in its own log how each global model does on its test data.

A deployment has no central evaluator (the server cannot decrypt), and federated
evaluation is off by default (it discloses every client's metric to the server). So
the edge client evaluates every global model it receives on its own test data and
logs it, sending nothing: from a train message's global model once the task is done,
and from an evaluate message's reply when federated evaluation is on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from sepals.client.edge import EdgeClient
from sepals.client.edge_app import load_edge_app
from sepals.common.protocol import FAB_NAME, KEY_CONFIG, KEY_GLOBAL, RoundConfig
from sepals.common.round_signature import OperatorSigner
from sepals.server.control.provision import ProvisionSpec, provision

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "edge_app.py"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local-eval") / "b"
    provision(ProvisionSpec(out=out, clients=1, server_host="127.0.0.1", rounds=3, batch_size=64))
    return out


def _signed(client: EdgeClient, bundles: Path, kind: str, server_round: int) -> Message:
    """The operator's round message, as the server would send it (the initial model)."""
    plan = client.bundle.plan
    signer = OperatorSigner.for_plan(bundles / "server" / "operator.key", plan)
    arrays = ArrayRecord()  # no aggregate yet: the shared seeded round-0 model
    config = signer(kind, RoundConfig.for_plan(plan, server_round).to_record_dict(), arrays)
    content = RecordDict({KEY_GLOBAL: arrays, KEY_CONFIG: ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type=kind)


@pytest.mark.usefixtures("run_identity")
def test_the_client_logs_its_own_evaluation_of_each_global_model(
    bundles: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = load_edge_app(f"{EXAMPLE}:make_app", {"partition": "0", "partitions": "3"})
    ctx = Context(run_id=9, node_id=1, node_config={}, state=RecordDict(), run_config={})
    fab = f"sepals/{FAB_NAME}"
    with (
        caplog.at_level(logging.INFO, logger="sepals"),
        EdgeClient(
            bundles / "clients" / "client-1",
            app,
            ledger_path=tmp_path / "ledger.json",
            work_dir=tmp_path,
        ) as client,
    ):
        reply = client._handle(_signed(client, bundles, MessageType.TRAIN, 1), ctx, fab)
        assert not reply.has_error(), reply.error
        client._local.evaluate_pending()  # what run() does once the task is done
        reply = client._handle(_signed(client, bundles, MessageType.EVALUATE, 1), ctx, fab)
        assert not reply.has_error(), reply.error
    lines = [r.getMessage() for r in caplog.records if "on its own" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("client client-1: the initial model: accuracy ")
    assert lines[0].endswith("on its own 120 test examples (local only)")
    assert lines[1].startswith("client client-1: the global model of round 1: accuracy ")
    assert lines[1].endswith("(sent for federated evaluation)")
