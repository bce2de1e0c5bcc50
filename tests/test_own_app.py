"""Own apps in simulation: EdgeApp loss/metric/device, partitioning, output, the API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sepals.client import EdgeApp
from sepals.client.privacy import PrivacyLedger
from sepals.client.secret_random import DpRandomness
from sepals.client.training import (
    TrainSettings,
    evaluate_model,
    make_dp_compatible,
    resolve_device,
    train_round,
)
from sepals.common.config import PrivacyConfig
from sepals.common.partition import PartitionSpec
from sepals.simulations import cli
from sepals.simulations.app_data import _partition_labels, app_caps, app_client_data
from sepals.simulations.config import AppSource, bundled_source, pickle_app
from sepals.simulations.reasons import clean_reason

ROOT = Path(__file__).resolve().parents[1]
REGRESSION = ROOT / "examples" / "regression_app.py"


def _regression_data(n: int = 200, seed: int = 0) -> TensorDataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32))[:, None]
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.float32)))


def _linear() -> nn.Module:
    return nn.Linear(4, 1)


def _mse_metric(out: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.mean((out - y) ** 2))


# --------------------------------------------------------------------------- EdgeApp
def test_edge_app_defaults_stay_classification():
    app = EdgeApp(model_factory=_linear, train_data=_regression_data(8))
    assert app.loss_fn is None and app.metric is None
    assert app.metric_name == "accuracy" and app.higher_is_better and app.device == "auto"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_data": None}, "train_data must hold"),
        ({"metric": _mse_metric}, "must name it"),
        ({"metric": _mse_metric, "metric_name": " "}, "non-empty"),
        ({"device": "tpu"}, "device must be"),
        ({"loss_fn": 3}, "loss_fn must be callable"),
    ],
)
def test_edge_app_rejects_bad_fields(kwargs, message):
    base = {"model_factory": _linear, "train_data": _regression_data(8)}
    with pytest.raises(ValueError, match=message):
        EdgeApp(**{**base, **kwargs})


def test_edge_app_with_client_data_only_is_valid():
    app = EdgeApp(model_factory=_linear, client_data=lambda i, n: (_regression_data(8), None))
    assert app.train_dataset is None


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("dp", [False, True])
def test_custom_loss_trains_a_regression(dp):
    data = _regression_data()
    factory = make_dp_compatible(_linear)
    privacy = PrivacyConfig(target_epsilon=8.0 if dp else None, max_grad_norm=5.0)
    ledger = PrivacyLedger.empty(privacy)
    if dp:
        ledger = ledger.calibrated(privacy, 32 / len(data), 30, 1)
    settings = TrainSettings(
        epochs=5, batch_size=32, learning_rate=0.05, randomness=DpRandomness(1)
    )
    torch.manual_seed(0)
    w0 = np.concatenate([p.detach().numpy().ravel() for p in factory().parameters()])
    before, _, _ = evaluate_model(
        factory, w0, data, loss_fn=nn.functional.mse_loss, metric=_mse_metric
    )
    out = train_round(
        factory, w0, data, settings, privacy, ledger, 1, loss_fn=nn.functional.mse_loss
    )
    loss, mse, count = evaluate_model(
        factory, out.weights, data, loss_fn=nn.functional.mse_loss, metric=_mse_metric
    )
    assert count == len(data)
    assert loss == pytest.approx(mse, rel=1e-5)  # the loss is averaged per example
    assert mse < 0.5 * before
    assert (out.ledger.epsilon is not None) == dp


def test_loss_that_is_not_a_batch_mean_is_refused():
    data = _regression_data(64)
    privacy = PrivacyConfig(target_epsilon=None)

    def per_example(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out - y) ** 2

    with pytest.raises(ValueError, match="0-dim tensor"):
        train_round(
            _linear, None, data, TrainSettings(), privacy, PrivacyLedger.empty(privacy), 1,
            loss_fn=per_example,
        )


def test_default_evaluation_is_cross_entropy_and_accuracy():
    x = torch.eye(3)
    data = TensorDataset(x, torch.tensor([0, 1, 2]))
    factory = lambda: nn.Linear(3, 3, bias=False)  # noqa: E731
    weights = np.eye(3).ravel() * 10
    loss, acc, n = evaluate_model(factory, weights, data)
    assert (acc, n) == (1.0, 3)
    assert loss == pytest.approx(float(nn.functional.cross_entropy(x * 10, data.tensors[1])))


# --------------------------------------------------------------------------- partitions
def test_continuous_targets_are_binned_for_label_skew():
    y = np.linspace(-1, 1, 100)[:, None]
    labels = _partition_labels(y, PartitionSpec.parse("dirichlet:0.5"))
    assert labels.dtype == np.int64 and set(labels) == set(range(10))
    assert (_partition_labels(y, PartitionSpec.parse("iid")) == 0).all()
    classes = np.array([[0], [2], [1]])
    assert _partition_labels(classes, PartitionSpec.parse("shards:2")).tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="one target per example"):
        _partition_labels(np.zeros((5, 2)), PartitionSpec.parse("dirichlet:1"))


def test_app_data_is_split_among_clients():
    source = AppSource(spec=f"{REGRESSION}:make_app")
    app = source.load()
    parts = [app_client_data(source, 4, "dirichlet:1", 0, i) for i in range(4)]
    assert sum(len(tr) for tr, _ in parts) == len(app.train_dataset)
    assert sum(len(te) for _, te in parts) == len(app.test_dataset)
    rows = [set(tr.indices) for tr, _ in parts]
    assert not set.intersection(*rows)
    assert min(app_caps(source, 4, "dirichlet:1", 0)) >= 1


_EMPTY_APP = EdgeApp(
    model_factory=_linear,
    client_data=lambda i, n: (_regression_data(0 if i == 1 else 8), None),
)


def test_a_client_without_training_data_is_refused_before_the_run():
    source = AppSource(pickled=pickle_app(_EMPTY_APP))
    with pytest.raises(ValueError, match="client-1"):
        app_caps(source, 3, "iid", 0)


def test_pickled_app_round_trips():
    source = AppSource(pickled=pickle_app(_EMPTY_APP))
    train, test = source.load().client_data(0, 3)
    assert len(train) == 8 and test is None


# --------------------------------------------------------------------------- output
def test_clean_reason_drops_ansi_and_tracebacks():
    raw = (
        "?[91mERROR?[0m: Traceback (most recent call last):?  File \"x.py\", line 3, in f?"
        "ValueError: bad thing happened"
    )
    assert clean_reason(raw) == "ValueError: bad thing happened"
    assert clean_reason("\x1b[31mduplicate ciphertext\x1b[0m") == "duplicate ciphertext"
    assert len(clean_reason("x" * 1000)) == 300
    assert len(clean_reason("y" * 1000, 60)) == 60


def test_cli_rejects_bad_app_flags(capsys):
    assert cli.main(["--app-arg", "a=1"]) == 2
    assert "--app-arg needs --app" in capsys.readouterr().err
    assert cli.main(["--app", "no_such_module_xyz:app"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_module_xyz" in err
    assert cli.main(["--app", f"{REGRESSION}:make_app", "--app-arg", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_cli_takes_the_apps_privacy_unless_told():
    args = cli.build_parser().parse_args(["--app", f"{REGRESSION}:make_app", "--app-arg",
                                          "epsilon=3"])
    config = cli.config_from_args(args)
    assert config.privacy.target_epsilon == 3.0 and config.app_args == (("epsilon", "3"),)
    args = cli.build_parser().parse_args(["--app", f"{REGRESSION}:make_app", "--epsilon", "0"])
    assert not cli.config_from_args(args).privacy.enabled
    assert cli.config_from_args(cli.build_parser().parse_args([])).privacy.target_epsilon == 8.0


def test_server_accepts_an_apps_own_metric_in_evaluate_replies():
    from sepals.server.serverapp.replies import ReplyRejected, parse_eval_metrics

    m = parse_eval_metrics({"num-examples": 5, "loss": 0.3, "metric": -2.5}, 10)
    assert (m.accuracy, m.metric) == (None, -2.5)
    with pytest.raises(ReplyRejected, match="metric must be a finite number"):
        parse_eval_metrics({"num-examples": 5, "loss": 0.3, "metric": float("nan")}, 10)
    with pytest.raises(ReplyRejected, match="accuracy must be"):
        parse_eval_metrics({"num-examples": 5, "loss": 0.3}, 10)


def test_simulate_rejects_what_is_not_an_app():
    from sepals.simulations import simulate

    with pytest.raises(ValueError, match="spec string or an EdgeApp"):
        simulate(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cli_names_excluded_clients_and_fails_when_nothing_aggregates(tmp_path):
    app_file = tmp_path / "broken_app.py"
    app_file.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REGRESSION.parent)!r})\n"
        "import dataclasses, regression_app\n"
        "def per_example(out, y):\n"
        "    return (out - y) ** 2\n"
        "def make_app():\n"
        "    return dataclasses.replace(regression_app.make_app(), loss_fn=per_example)\n"
    )
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sepals.simulations.cli", "--app", f"{app_file}:make_app",
         "--clients", "3", "--rounds", "2", "--cpus", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("starting: 3 clients")
    assert lines[1].startswith("started in ")
    assert lines[2].startswith("round   1/2")
    # The client's own reason, on the round line and in the report, without -v.
    assert "excluded: client-" in lines[2] and "loss_fn must return a 0-dim tensor" in lines[2]
    assert "\x1b" not in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("sepals-sim: error: no round aggregated")
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["aggregated_rounds"] == 0
    excluded = report["rounds"][0]["excluded"]
    assert sorted(e["client"] for e in excluded) == ["client-0", "client-1", "client-2"]
    assert all(len(e["reason"]) <= 300 for e in excluded)
    assert all(e["reason"] == "loss is not a batch mean" for e in excluded)
    assert all("loss_fn must return a 0-dim tensor" in e["detail"] for e in excluded)


@pytest.mark.slow
def test_simulate_an_edge_app_object_with_client_data(tmp_path):
    from sepals.simulations import simulate

    def client_data(i: int, n: int):
        return _regression_data(60, seed=i), _regression_data(20, seed=100 + i)

    app = EdgeApp(
        model_factory=_linear,
        client_data=client_data,
        test_data=_regression_data(100, seed=999),
        loss_fn=nn.functional.mse_loss,
        metric=_mse_metric,
        metric_name="mse",
        higher_is_better=False,
        privacy=PrivacyConfig(target_epsilon=None),
    )
    rows = []
    report, model = simulate(
        app, clients=2, rounds=3, encryption="none", out=tmp_path / "run", cpus=2,
        learning_rate=0.1, batch_size=16, progress=rows.append, device="cpu",
        fraction_evaluate=1.0,
    )
    assert all(r["federated_metric"] is not None for r in rows)
    assert rows[-1]["federated_accuracy"] is None
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["accuracy"] is None and rows[-1]["metric"] == report["final"]["metric"]
    assert report["final"]["metric"] < 0.5 * report["initial"]["metric"]
    assert report["final"]["epsilon"] is None
    assert isinstance(model, nn.Linear)
    test = _regression_data(100, seed=999)
    with torch.no_grad():
        mse = _mse_metric(model(test.tensors[0]), test.tensors[1])
    assert mse == pytest.approx(report["final"]["metric"], rel=1e-4)
    # fairness: each client's own test data (from client_data), lower mse is better
    fair = report["final"]["fairness"]
    assert fair["metric"] == "mse" and not fair["higher_is_better"] and fair["count"] == 2
    assert fair["worst10_mean"] == fair["max"]
    for i in range(2):
        own = _regression_data(20, seed=100 + i)
        with torch.no_grad():
            value = _mse_metric(model(own.tensors[0]), own.tensors[1])
        assert fair["clients"][f"client-{i}"] == pytest.approx(value, rel=1e-4)


@pytest.mark.parametrize(
    ("dataset", "clients", "partition"),
    [("synthetic:1,1", 40, "iid"), ("digits", 7, "iid"), ("digits", 7, "dirichlet:0.5")],
)
def test_a_bundled_app_counts_its_clients_without_building_them(
    dataset: str, clients: int, partition: str
) -> None:
    source = bundled_source(dataset, clients, partition, 3)
    app = source.load()
    counted = app.client_data.sizes(clients)  # type: ignore[union-attr]
    built = []
    for k in range(clients):
        train, test = app.client_data(k, clients)  # type: ignore[misc]
        built.append((len(train), len(test)))
    assert counted == built
    assert app_caps(source, clients, partition, 3) == [max(n, m, 1) for n, m in built]
