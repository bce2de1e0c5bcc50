"""sepals as a Flower app: ``flwr run .``, and stock Flower apps meeting sepals ones.

In-process tests exchange real Flower messages between a stock Flower 1.41 app
(``FedAvg``, a ClientApp that reads ``msg.content["arrays"]``) and a sepals one, in both
directions. ``flwr run .`` itself, in Flower's local simulation, runs as the README
shows it in ``tests/test_docs_run.py``.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.serverapp.strategy import FedAvg

from sepals.client.app import (
    ERR_PROTOCOL_MISMATCH,
    PROTOCOL_MISMATCH_REASON,
    make_client_app,
)
from sepals.client.app import protocol_mismatch as client_mismatch
from sepals.common.codec import PlainCodec
from sepals.common.federation import FederationConfig
from sepals.common.protocol import KEY_CLIENT, KEY_METRICS, KEY_UPDATE
from sepals.common.records import KEY_PAYLOAD, payload_array
from sepals.server.serverapp.app import (
    MISMATCH_NOTE,
    NoRoundAggregatedError,
    SepalsFedAvg,
    ServerSettings,
    build_strategy,
    require_aggregation,
)
from sepals.server.serverapp.app import protocol_mismatch as server_mismatch
from sepals.simulations.flwr_app import FlowerJob

pytestmark = pytest.mark.usefixtures("run_identity")

ROOT = Path(__file__).resolve().parents[1]
NODES = [11, 12]


class FakeGrid:
    """A Grid whose nodes are in-process ClientApps (what Flower's simulation does)."""

    def __init__(self, client_app: ClientApp | None = None, nodes: list[int] = NODES) -> None:
        self.client_app = client_app
        self.nodes = nodes
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in nodes
        }

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> Any:
        return [self.deliver(m) for m in messages]

    def deliver(self, msg: Message) -> Message:
        """Run the ClientApp on ``msg`` and wrap a raise as Flower's simulation does."""
        assert self.client_app is not None
        context = self.contexts[msg.metadata.dst_node_id]
        try:
            return self.client_app(message=msg, context=context)
        except Exception as ex:  # as flwr/simulation/ray_transport/ray_actor.py + vce_api.py
            wrapped = ClientAppException(str(ex))
            reason = str(type(wrapped)) + ":<'" + str(wrapped) + "'>"
            return Message(Error(code=2, reason=reason), reply_to=msg)


def _stock_client_app() -> ClientApp:
    """A stock Flower 1.41 ClientApp, as in Flower's quickstart templates."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        lr = msg.content["config"]["lr"]
        assert isinstance(arrays, ArrayRecord)
        metrics = MetricRecord({"train_loss": 0.5, "lr": float(lr), "num-examples": 10})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _ = msg.content["arrays"]
        metrics = MetricRecord({"eval_acc": 0.5, "num-examples": 10})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _sepals_strategy(rounds: int = 2) -> SepalsFedAvg:
    fed = FederationConfig(rounds=rounds, min_train_clients=1, fraction_evaluate=1.0)
    strategy = build_strategy(
        ServerSettings(federation=fed, codec=PlainCodec(), vector_length=4)
    )
    assert isinstance(strategy, SepalsFedAvg)
    strategy.node_wait_timeout = 0.0
    return strategy


# --------------------------------------------------------------------------- server side
def test_stock_client_meets_sepals_server_one_clear_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = _sepals_strategy(rounds=2)
    grid = FakeGrid(_stock_client_app())
    with caplog.at_level(logging.DEBUG, logger="sepals"):
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=2)  # type: ignore[arg-type]
    # Every round excluded both nodes, with the protocol-mismatch reason, no traceback.
    assert [r.aggregated for r in strategy.history] == [False, False]
    for record in strategy.history:
        assert sorted(n for n, _ in record.excluded) == NODES
        for _node, reason in record.excluded:
            assert reason.startswith(MISMATCH_NOTE), reason
            assert "'arrays'" in reason
            assert "Traceback" not in reason and "\n" not in reason
        assert record.replied == len(NODES)
    # One ERROR line per node for the whole run, naming the mismatch.
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == len(NODES), errors
    assert all("protocol mismatch" in e for e in errors)
    # And the run fails: nothing was aggregated.
    with pytest.raises(NoRoundAggregatedError, match="not sepals clients"):
        require_aggregation(strategy)


def test_stock_reply_without_update_record_is_a_mismatch() -> None:
    strategy = _sepals_strategy()
    (msg, *_) = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid())  # type: ignore[arg-type]
    stock = Message(
        RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": 5})}),
        reply_to=msg,
    )
    reason = server_mismatch(stock)
    assert reason is not None and f"lacks the sepals '{KEY_UPDATE}' record" in reason
    # A sepals-shaped reply, even a bad one, is left to the strategy's own checks.
    sepals_reply = Message(
        RecordDict(
            {
                KEY_UPDATE: ArrayRecord({KEY_PAYLOAD: payload_array(b"junk")}),
                KEY_METRICS: MetricRecord({"num-examples": 5}),
                KEY_CLIENT: ConfigRecord({"client-id": "c"}),
            }
        ),
        reply_to=msg,
    )
    assert server_mismatch(sepals_reply) is None
    # So is a sepals client's own error reply, and Flower's other errors.
    declined = Message(Error(code=4101, reason="privacy budget exhausted"), reply_to=msg)
    assert server_mismatch(declined) is None
    crashed = Message(Error(code=2, reason="<class 'ValueError'>:<'boom'>"), reply_to=msg)
    assert server_mismatch(crashed) is None


def test_require_aggregation_passes_when_a_round_aggregated() -> None:
    from sepals.server.serverapp.strategy import RoundRecord

    strategy = _sepals_strategy()
    strategy.history.extend([RoundRecord(round=1), RoundRecord(round=2, aggregated=True)])
    require_aggregation(strategy)
    strategy.history[1].aggregated = False
    strategy.history[1].excluded.append((3, "malformed payload"))
    with pytest.raises(NoRoundAggregatedError, match="malformed payload"):
        require_aggregation(strategy)
    strategy.history.clear()
    with pytest.raises(NoRoundAggregatedError, match="0 round"):
        require_aggregation(strategy)


# --------------------------------------------------------------------------- client side
def test_sepals_client_meets_stock_fedavg_one_clear_error() -> None:
    calls: list[int] = []

    def provider(context: Context) -> Any:
        calls.append(context.node_id)
        raise AssertionError("a mismatched message must not reach the runtime")

    sepals_app = make_client_app(provider)
    fedavg = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=1)
    grid = FakeGrid(sepals_app)
    arrays = ArrayRecord({"w": payload_array(b"\x00" * 8)})
    config = ConfigRecord({"lr": 0.01})
    messages = [
        *fedavg.configure_train(1, arrays, config, grid),  # type: ignore[arg-type]
        *fedavg.configure_evaluate(1, arrays, config, grid),  # type: ignore[arg-type]
    ]
    assert len(messages) == 2 * len(NODES)
    for msg in messages:
        reply = grid.deliver(msg)
        assert reply.has_error()
        assert reply.error.code == ERR_PROTOCOL_MISMATCH
        assert reply.error.reason == PROTOCOL_MISMATCH_REASON
        assert "sepals client" in reply.error.reason and "not a sepals server" in reply.error.reason
    assert calls == []
    # Stock FedAvg itself then sees only error replies and aggregates nothing.
    train_replies = [grid.deliver(m) for m in fedavg.configure_train(1, arrays, config, grid)]  # type: ignore[arg-type]
    assert fedavg.aggregate_train(1, train_replies) == (None, None)


def test_sepals_messages_are_not_a_mismatch() -> None:
    strategy = _sepals_strategy()
    for msg in strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid()):  # type: ignore[arg-type]
        assert client_mismatch(msg) is None
    bare = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type="train",
    )
    assert client_mismatch(bare) is not None
    assert client_mismatch(Message(RecordDict(), dst_node_id=1, message_type="train")) is not None


# --------------------------------------------------------------------------- the job
def test_pyproject_names_real_flower_apps() -> None:
    from flwr.clientapp import ClientApp as FlowerClientApp
    from flwr.serverapp import ServerApp
    from flwr.supercore.object_ref import load_app

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flwr_cfg = config["tool"]["flwr"]
    assert flwr_cfg["app"]["publisher"] == "sepals"
    assert "federations" not in flwr_cfg  # `flwr run` would rewrite the file to migrate it
    components = flwr_cfg["app"]["components"]
    server = load_app(components["serverapp"], ValueError, ROOT)
    client = load_app(components["clientapp"], ValueError, ROOT)
    assert isinstance(server, ServerApp) and isinstance(client, FlowerClientApp)
    job = FlowerJob.from_run_config(flwr_cfg["app"]["config"])
    assert job.privacy.target_epsilon == 8.0 and job.scheme == "bfv" and job.dataset == "digits"


def test_job_config_is_checked() -> None:
    with pytest.raises(ValueError, match=r"unknown run config key.*'round'"):
        FlowerJob.from_run_config({"round": 3})
    with pytest.raises(ValueError, match="'rounds' must be an integer"):
        FlowerJob.from_run_config({"rounds": 2.5})
    with pytest.raises(ValueError, match="'dataset' must be one of"):
        FlowerJob.from_run_config({"dataset": "cifar"})
    with pytest.raises(ValueError, match="'epsilon' must be >= 0"):
        FlowerJob.from_run_config({"epsilon": -1.0})
    off = FlowerJob.from_run_config({"epsilon": 0, "scheme": "none"})
    assert not off.privacy.enabled and not off.encryption(4).enabled
    assert FlowerJob.from_run_config({"fraction-train": 0.5}).encryption(10).max_clients == 5


def test_a_runtime_installed_environment_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sepals.simulations.flwr_app import RuntimeInstallError, check_no_runtime_install

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    check_no_runtime_install()  # control: nothing installed
    site = tmp_path / "runtime-envs" / "123" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(RuntimeInstallError, match="FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"):
        check_no_runtime_install()


def test_flwr_serverapp_fails_when_no_round_aggregates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The ServerApp of ``flwr run .`` raises, so Flower marks the run failed."""
    from sepals.simulations.flwr_app import server_app

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    grid = FakeGrid(_stock_client_app())
    context = Context(
        run_id=77,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"rounds": 2, "scheme": "none", "epsilon": 0.0},
    )
    with pytest.raises(NoRoundAggregatedError, match="protocol mismatch"):
        server_app(grid, context)  # type: ignore[arg-type]
    run_dir = tmp_path / "flwr-home" / "sepals-runs" / "77"
    assert (run_dir / "plan.json").is_file()


def test_flwr_serverapp_never_holds_the_secret_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys come from a provisioning subprocess; the secret file is gone after the run."""
    import sepals.common.scheme as codec

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))

    def forbidden(*_a: object, **_k: object) -> Any:
        raise AssertionError("the ServerApp process generated a secret key")

    monkeypatch.setattr(codec, "generate_secret_context", forbidden)
    from sepals.simulations.flwr_app import server_app

    seen: dict[str, Any] = {}
    grid = FakeGrid(_stock_client_app())
    real_deliver = grid.deliver

    def deliver(msg: Message) -> Message:
        secret = tmp_path / "flwr-home" / "sepals-runs" / "78" / "keys" / "clients.secret"
        seen["mode"] = secret.stat().st_mode & 0o777
        return real_deliver(msg)

    grid.deliver = deliver  # type: ignore[method-assign]
    context = Context(
        run_id=78, node_id=0, node_config={}, state=RecordDict(), run_config={"rounds": 1}
    )
    with pytest.raises(NoRoundAggregatedError):
        server_app(grid, context)  # type: ignore[arg-type]
    assert seen["mode"] == 0o600
    assert not (tmp_path / "flwr-home" / "sepals-runs" / "78" / "keys" / "clients.secret").exists()
