"""Per-client fairness: the spread statistics, per-client test splits, reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from sepals.common.codec import PlainCodec
from sepals.common.data import load_dataset
from sepals.common.fairness import ClientSpread, client_spread, format_spread, worst_count
from sepals.common.federation import FederationConfig
from sepals.common.partition import (
    PartitionSpec,
    _cached_partitions,
    client_example_caps,
    client_partition,
    client_test_indices,
    partition_like,
)
from sepals.common.protocol import KEY_CLIENT, KEY_METRICS
from sepals.server.serverapp.replies import EvalMetrics
from sepals.server.serverapp.roster import NodeRoster
from sepals.server.serverapp.strategy import EncryptedFedAvg, evaluation_spread

# --------------------------------------------------------------------------- spread


def test_worst_count_is_a_tenth_rounded_up_and_at_least_one():
    assert [worst_count(n) for n in (1, 9, 10, 11, 20, 30, 31, 1000)] == [
        1, 1, 1, 2, 2, 3, 4, 100,
    ]
    with pytest.raises(ValueError, match="at least one client"):
        worst_count(0)


def test_spread_of_known_values():
    values = [0.9, 0.5, 1.0, 0.7, 0.8, 0.6, 0.95, 0.85, 0.75, 0.65, 0.55]  # 11 clients
    s = client_spread(values)
    assert (s.count, s.min, s.max, s.worst_count) == (11, 0.5, 1.0, 2)
    assert s.median == 0.75
    assert s.worst10_mean == pytest.approx((0.5 + 0.55) / 2)
    lower = client_spread(values, higher_is_better=False)  # an error: worst are the highest
    assert lower.worst10_mean == pytest.approx((1.0 + 0.95) / 2) and not lower.higher_is_better
    even = client_spread([4, 1, 3, 2])
    assert even.median == 2.5 and even.worst10_mean == 1.0
    assert client_spread(np.array([0.25], dtype=np.float32)).to_dict() == {
        "count": 1, "min": 0.25, "median": 0.25, "max": 0.25, "worst10_mean": 0.25,
        "worst_count": 1, "higher_is_better": True,
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([], "no client values"),
        ([0.5, math.nan], r"#1 is nan, not a finite number"),
        ([math.inf], r"#0 is inf"),
        ([0.5, True], r"#1 is a bool, not a number"),
        (["0.5"], r"#0 is a str"),
        ([None], r"#0 is a NoneType"),
    ],
)
def test_spread_refuses_empty_or_non_finite_input(values, message):
    with pytest.raises(ValueError, match=message):
        client_spread(values)


def test_spread_dataclass_checks_itself():
    with pytest.raises(ValueError, match="count >= 1"):
        ClientSpread(0, 0.0, 0.0, 0.0, 0.0, 1)
    with pytest.raises(ValueError, match="min <= median <= max"):
        ClientSpread(2, 0.5, 0.4, 0.6, 0.5, 1)
    with pytest.raises(ValueError, match="outside"):
        ClientSpread(2, 0.5, 0.5, 0.6, 0.7, 1)
    with pytest.raises(ValueError, match="finite"):
        ClientSpread(2, 0.5, 0.5, math.nan, 0.5, 1)
    with pytest.raises(ValueError, match="worst_count"):
        ClientSpread(2, 0.5, 0.5, 0.6, 0.5, 3)


finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=300), st.booleans(), st.randoms())
def test_spread_properties(values, higher, rnd):
    s = client_spread(values, higher_is_better=higher)
    ordered = sorted(values)
    k = s.worst_count
    assert s.count == len(values) and s.min == ordered[0] and s.max == ordered[-1]
    assert k == max(1, math.ceil(len(values) / 10)) and k <= len(values)
    worst = ordered[:k] if higher else ordered[-k:]
    assert s.worst10_mean == pytest.approx(sum(worst) / k, rel=1e-9, abs=1e-6)
    # the worst tenth is never better than the median client
    if higher:
        assert s.min <= s.worst10_mean <= s.median
    else:
        assert s.median <= s.worst10_mean <= s.max
    shuffled = list(values)
    rnd.shuffle(shuffled)
    assert client_spread(shuffled, higher_is_better=higher) == s


def test_format_spread():
    s = client_spread([0.8333333, 0.9166667, 1.0, 0.9166667]).to_dict()
    assert format_spread(s) == "clients min 83.3% med 91.7% max 100% worst10% 83.3%"
    r2 = client_spread([0.5, 0.75]).to_dict()
    assert format_spread(r2, "r2") == "clients r2 min 0.5 med 0.625 max 0.75 worst10% 0.5"
    assert format_spread(None) == ""


# --------------------------------------------------------------------------- test splits


def _label_shares(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=classes) / max(len(labels), 1)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12),  # clients
    st.integers(1, 6),  # classes
    st.integers(0, 200),  # test rows
    st.integers(0, 2**16),  # seed
    st.data(),
)
def test_partition_like_partitions_the_test_rows(clients, classes, n_test, seed, data):
    rng = np.random.default_rng(seed)
    train = rng.integers(0, classes, size=clients * 5).astype(np.int64) - 2  # negatives too
    owners = data.draw(st.lists(st.integers(0, clients - 1), min_size=len(train),
                                max_size=len(train)))
    parts = [np.flatnonzero(np.array(owners) == k).astype(np.int64) for k in range(clients)]
    test = rng.integers(0, classes + 1, size=n_test).astype(np.int64) - 2  # one unseen class
    out = partition_like(test, train, parts, seed)
    assert len(out) == clients
    joined = np.concatenate(out)
    assert sorted(joined.tolist()) == list(range(n_test))  # each row exactly once
    assert all(np.all(np.diff(p) > 0) for p in out)
    again = partition_like(test, train, parts, seed)
    assert all(np.array_equal(a, b) for a, b in zip(out, again, strict=True))
    # with at least as many test rows as clients, every training client can evaluate
    # as long as rows could be moved (the donors' classes); at least, no one is worse off
    if n_test >= 2 * clients and len(set(test.tolist())) == 1:
        assert all(len(p) > 0 for k, p in enumerate(out) if len(parts[k]) > 0)


def test_partition_like_refuses_no_clients_or_no_train_rows():
    with pytest.raises(ValueError, match="at least one client"):
        partition_like(np.zeros(3, np.int64), np.zeros(3, np.int64), [], 0)
    with pytest.raises(ValueError, match="train rows"):
        partition_like(np.zeros(3, np.int64), np.zeros(3, np.int64), [np.zeros(0, np.int64)], 0)


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.5", "dirichlet:0.1", "shards:2"])
def test_client_test_splits_partition_the_test_split(partition):
    data = load_dataset("digits", 0)
    idx = client_test_indices("digits", 10, partition, 0)
    assert sorted(np.concatenate(idx).tolist()) == list(range(len(data.test)))
    caps = client_example_caps("digits", 10, partition, 0)
    for k in range(10):
        train, test = client_partition("digits", 10, partition, 0, k)
        assert np.array_equal(test.y, data.test.y[idx[k]])
        assert caps[k] == max(len(train), len(test)) and len(test) > 0


def test_iid_test_splits_stay_iid():
    idx = client_test_indices("digits", 10, "iid", 3)
    old = _cached_partitions("digits", 10, "iid", 3, "test")  # the IID split of before
    assert all(np.array_equal(a, b) for a, b in zip(idx, old, strict=True))


@pytest.mark.parametrize("alpha", [0.5, 0.1])
def test_dirichlet_test_splits_follow_each_clients_train_labels(alpha):
    partition = f"dirichlet:{alpha}"
    data = load_dataset("digits", 0)
    train = _cached_partitions("digits", 10, str(PartitionSpec.parse(partition)), 0, "train")
    idx = client_test_indices("digits", 10, partition, 0)
    iid = client_test_indices("digits", 10, "iid", 0)
    ours, before = [], []
    for k in range(10):
        target = _label_shares(data.train.y[train[k]], 10)
        # total variation distance between the train and test label distributions
        ours.append(0.5 * np.abs(target - _label_shares(data.test.y[idx[k]], 10)).sum())
        before.append(0.5 * np.abs(target - _label_shares(data.test.y[iid[k]], 10)).sum())
        # test examples of a class the client never trains on are (almost) absent
        unseen = np.bincount(data.train.y[train[k]], minlength=10) == 0
        assert _label_shares(data.test.y[idx[k]], 10)[unseen].sum() <= 1 / len(idx[k]) + 1e-9
    # the IID test split ignores the skew; ours follows it closely
    assert np.mean(ours) < 0.25 * np.mean(before)


def test_test_splits_are_deterministic_and_seeded():
    a = client_test_indices("digits", 10, "dirichlet:0.5", 0)
    b = client_test_indices("digits", 10, "dirichlet:0.5", 0)
    c = client_test_indices("digits", 10, "dirichlet:0.5", 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_synthetic_test_splits_are_the_clients_own():
    name = "synthetic:1,1"
    data = load_dataset(name, 0, num_clients=5)
    idx = client_test_indices(name, 5, "iid", 0)
    assert sorted(np.concatenate(idx).tolist()) == list(range(len(data.test)))
    for k in range(5):
        _, test = client_partition(name, 5, "iid", 0, k)
        assert np.array_equal(data.test.y[idx[k]], test.y)


def test_app_test_split_follows_the_train_labels():
    from torch.utils.data import TensorDataset

    from sepals.client.edge_app import EdgeApp
    from sepals.simulations.app_data import app_client_data
    from sepals.simulations.config import AppSource, pickle_app

    rng = np.random.default_rng(0)
    y_train = torch.from_numpy(rng.integers(0, 4, 400))
    y_test = torch.from_numpy(rng.integers(0, 4, 120))
    app = EdgeApp(
        model_factory=lambda: torch.nn.Linear(3, 4),
        train_data=TensorDataset(torch.zeros(400, 3), y_train),
        test_data=TensorDataset(torch.zeros(120, 3), y_test),
    )
    source = AppSource(pickled=pickle_app(app))
    parts = [app_client_data(source, 4, "dirichlet:0.3", 0, k) for k in range(4)]
    rows = sorted(i for _, te in parts if te is not None for i in te.indices)
    assert rows == list(range(120))
    for train, test in parts:
        assert test is not None
        shares = _label_shares(y_train[train.indices].numpy(), 4)
        got = _label_shares(y_test[test.indices].numpy(), 4)
        assert 0.5 * np.abs(shares - got).sum() < 0.2
    iid = [app_client_data(source, 4, "iid", 0, k)[1] for k in range(4)]
    assert sorted(len(t) for t in iid) == [30, 30, 30, 30]


# --------------------------------------------------------------------------- simulation


def test_grouped_accuracy_matches_per_client_evaluation():
    from sepals.client.training import evaluate_model
    from sepals.common.models import get_flat
    from sepals.simulations.evaluator import grouped_accuracy

    data = load_dataset("digits", 0)
    factory = data.model_factory()
    torch.manual_seed(0)
    weights = get_flat(factory())
    test = data.test.to_torch()
    idx = client_test_indices("digits", 7, "dirichlet:0.5", 0)
    owner = np.full(len(data.test), -1, dtype=np.int64)
    for k, rows in enumerate(idx):
        owner[rows] = k
    loss, acc, per_client = grouped_accuracy(factory, weights, test, owner, "cpu")
    ref_loss, ref_acc, _ = evaluate_model(factory, weights, test)
    assert loss == pytest.approx(ref_loss) and acc == pytest.approx(ref_acc)
    assert per_client is not None and sorted(per_client) == [f"client-{k}" for k in range(7)]
    for k, rows in enumerate(idx):
        _, own, _ = evaluate_model(factory, weights, data.test.subset(rows).to_torch())
        assert per_client[f"client-{k}"] == pytest.approx(own)
    _, _, none = grouped_accuracy(factory, weights, test, np.full_like(owner, -1), "cpu")
    assert none is None


def test_final_fairness_and_summary():
    from sepals.simulations.report import final_fairness, spread_of, summarize

    per = {"client-10": 1.0, "client-2": 0.5, "client-1": 0.75}
    spread = spread_of(per, True)
    assert spread is not None and spread["min"] == 0.5 and spread["count"] == 3
    final = final_fairness(spread, per, "accuracy")
    assert final is not None and list(final["clients"]) == ["client-1", "client-2", "client-10"]
    assert final["metric"] == "accuracy" and final["median"] == 0.75
    assert final_fairness(None, {}, "accuracy") is None and spread_of({}, True) is None
    report = {
        "final": {
            "accuracy": 0.8, "metric": 0.8, "metric_name": "accuracy", "epsilon": None,
            "wall_seconds": 1.0, "upload_bytes": 0, "download_bytes": 0, "fairness": final,
        }
    }
    assert "clients min 50% med 75% max 100% worst10% 50%" in summarize(report)


def test_round_line_shows_the_spread(capsys):
    from sepals.simulations.cli import progress_line

    row = {
        "round": 3, "epsilon": None, "loss": 0.5, "metric": 0.9, "accuracy": 0.9,
        "upload_bytes": 1000, "download_bytes": 1000, "seconds": 1.0,
        "fairness": client_spread([0.8, 1.0]).to_dict(),
    }
    progress_line(row, 5)
    assert "| clients min 80% med 90% max 100% worst10% 80%" in capsys.readouterr().out


def test_plots_include_the_per_client_distribution(tmp_path: Path):
    from sepals.simulations.plots import write_plots

    rows = [
        {"round": r, "accuracy": 0.5 + r / 10, "metric": 0.5 + r / 10, "epsilon": r * 0.5,
         "fairness": client_spread([0.4 + r / 10, 0.5 + r / 10, 0.6 + r / 10]).to_dict()}
        for r in (1, 2, 3)
    ]
    report = {"config": {"privacy": {"target_epsilon": 8.0, "delta": 1e-5}}, "rounds": rows,
              "initial": {"metric": 0.1, "loss": 2.0, "fairness": None}}
    written = write_plots(report, tmp_path)
    assert tmp_path / "accuracy_clients.png" in written
    assert (tmp_path / "accuracy_clients.png").stat().st_size > 0
    for row in rows:
        row["fairness"] = None
    (tmp_path / "x").mkdir()
    assert tmp_path / "x" / "accuracy_clients.png" not in write_plots(report, tmp_path / "x")
    assert not (tmp_path / "x" / "accuracy_clients.png").exists()


# --------------------------------------------------------------------------- deployment


def _eval_reply(node: int, n: int, loss: float, key: str, value: float) -> Message:
    orig = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    metrics = MetricRecord({"num-examples": n, "loss": loss, key: value})
    client = ConfigRecord({"client-id": f"c{node}"})
    content = RecordDict({KEY_METRICS: metrics, KEY_CLIENT: client})
    return Message(content, reply_to=orig)


@pytest.mark.usefixtures("run_identity")
def test_server_keeps_the_spread_of_federated_evaluation(tmp_path, caplog):
    from sepals.server.control.launcher import progress_line
    from sepals.server.serverapp.state import StateDir

    strategy = EncryptedFedAvg(
        PlainCodec(), 10, FederationConfig(rounds=1), roster=NodeRoster(default_cap=500)
    )
    accs = [0.5, 0.9, 1.0, 0.7, 0.8, 0.95, 0.85, 0.6, 0.75, 0.65, 0.99]
    replies = [_eval_reply(i + 1, 10 * (i + 1), 0.3, "accuracy", a) for i, a in enumerate(accs)]
    bad = _eval_reply(99, 10, 0.3, "accuracy", 1.5)  # excluded: not in the spread
    with caplog.at_level("DEBUG", logger="sepals"):
        strategy.aggregate_evaluate(1, [*replies, bad])
    record = strategy.history[-1]
    spread = record.federated_spread
    assert spread == client_spread(accs).to_dict()  # unweighted: one value per client
    assert spread["count"] == 11 and spread["worst10_mean"] == pytest.approx(0.55)
    # the server's own log gets no metric values (only the bad reply's exclusion)
    assert "0.99" not in caplog.text and "50%" not in caplog.text
    # metrics.jsonl carries the spread, and only the spread: no per-node values
    state = StateDir(tmp_path / "state")
    state.append_metrics(record)
    (line,) = state.read_metrics()
    assert line["federated_spread"] == spread
    assert "0.99" not in json.dumps({k: v for k, v in line.items() if k != "federated_spread"})
    assert "clients min 50% med 80% max 100% worst10% 55%" in progress_line(line, 1)
    # an app's own metric, lower is better: the worst are the highest
    strategy.metric_higher_is_better = False
    own = [_eval_reply(i + 1, 5, 0.1, "metric", m) for i, m in enumerate([0.2, 0.4, 0.3])]
    strategy.aggregate_evaluate(2, own)
    assert strategy.history[-1].federated_spread["worst10_mean"] == 0.4
    # nothing valid: no spread
    strategy.aggregate_evaluate(3, [bad])
    assert strategy.history[-1].federated_spread is None


def test_evaluation_spread_prefers_accuracy():
    replies = [EvalMetrics(5, 0.1, 0.5), EvalMetrics(5, 0.1, None, 3.0), EvalMetrics(5, 0.1, 1.0)]
    assert evaluation_spread(replies)["count"] == 2
    assert evaluation_spread([EvalMetrics(5, 0.1, None, 3.0)])["max"] == 3.0
    assert evaluation_spread([]) is None


# --------------------------------------------------------------------------- benchmark


def test_benchmark_table_helpers():
    from benchmarks.fairness import HEADER, Row, format_row, job_argv, main, row_from_report

    report = {"final": {"accuracy": 0.9, "epsilon": 7.98, "fairness": {
        **client_spread([0.8, 0.9, 1.0]).to_dict(), "clients": {}}}}
    row = row_from_report(report, "dirichlet:0.5", True, 51.2)
    assert row == Row("dirichlet:0.5", True, 7.98, 0.9, 0.8, 0.9, 1.0, 0.8, 3, 51.2)
    line = format_row(row)
    assert line.split() == ["dirichlet:0.5", "eps", "7.98", "90.00%", "80.00%", "90.00%",
                            "100.00%", "80.00%", "3", "51"]
    assert len(line) == len(HEADER)
    empty = row_from_report({"final": {"accuracy": None, "epsilon": None}}, "iid", False, 1.0)
    assert format_row(empty).split()[:4] == ["iid", "off", "n/a", "n/a"]
    assert job_argv("iid", False, 3, None, None) == [
        "--dataset", "digits", "--clients", "10", "--partition", "iid", "--seed", "3",
        "--epsilon", "0",
    ]
    assert job_argv("iid", True, 0, 3, 2)[-4:] == ["--rounds", "3", "--cpus", "2"]
    assert main(["--partitions", "bogus"]) == 2
    assert main(["--quick", "--rounds", "5"]) == 2


def test_evaluator_scores_an_apps_clients_and_leaves_out_non_finite_values(monkeypatch):
    from torch.utils.data import TensorDataset

    from sepals.common.codec import PlainCodec
    from sepals.simulations import evaluator

    def r2(out: torch.Tensor, y: torch.Tensor) -> float:
        return float(1 - ((out - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())

    def data(n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, generator=g)
        return TensorDataset(x, x.sum(dim=1, keepdim=True))

    state = {
        "codec": PlainCodec(), "factory": lambda: torch.nn.Linear(3, 1), "device": "cpu",
        "test": data(50, 0), "loss_fn": torch.nn.functional.mse_loss, "metric": r2,
        "owner": None,
        "client_tests": [("client-0", data(20, 1)), ("client-1", data(1, 2)),
                         ("client-2", data(30, 3))],
    }
    monkeypatch.setattr(evaluator, "_EVAL_STATE", state)
    loss, value, error, per_client = evaluator.evaluator_run(None, 0)
    assert error is None and loss is not None and value is not None
    # one example: R^2 divides by zero; that client is left out, not the run
    assert per_client is not None and sorted(per_client) == ["client-0", "client-2"]
    model = torch.nn.Linear(3, 1)
    from sepals.common.models import set_flat

    set_flat(model, state["latest"])
    with torch.no_grad():
        x, y = state["client_tests"][2][1].tensors
        assert per_client["client-2"] == pytest.approx(r2(model(x), y))

    def broken(out: torch.Tensor, y: torch.Tensor) -> float:
        if len(y) == 20:
            raise RuntimeError("boom")
        return 0.5

    state["metric"] = broken
    loss, value, error, per_client = evaluator.evaluator_run(None, 0)
    assert value == 0.5 and per_client is None
    assert error == "per-client evaluation: RuntimeError: boom"
