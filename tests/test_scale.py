"""1,000 clients: codec sizing by the sampled count, reproducible sampling, guard rails."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from sepals.common.codec import PlainCodec
from sepals.common.config import EncryptionConfig
from sepals.common.federation import FederationConfig, sampled_per_round
from sepals.server.serverapp.strategy import EncryptedFedAvg, simulation_node_order


@pytest.mark.parametrize(
    ("clients", "fraction", "minimum", "expected"),
    [
        (1000, 0.1, 1, 100),
        (1000, 1.0, 1, 1000),
        (10, 0.05, 1, 1),
        (10, 0.05, 3, 3),
        (10, 0.25, 1, 3),  # ceil
        (5, 0.5, 10, 5),  # never more than the federation
        (1, 1.0, 1, 1),
    ],
)
def test_sampled_per_round(clients, fraction, minimum, expected):
    assert sampled_per_round(clients, fraction, minimum) == expected


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 0.5, 1), "clients"),
        ((10, 0.0, 1), "fraction"),
        ((10, 1.5, 1), "fraction"),
        ((10, float("nan"), 1), "fraction"),
        ((10, 0.5, 0), "min_clients"),
    ],
)
def test_sampled_per_round_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        sampled_per_round(*args)


def test_cli_sizes_the_codec_by_the_sampled_count():
    """1,000 clients at fraction 0.1 under BFV: max_clients is 100, not 1,000."""
    from sepals.simulations.cli import build_parser, config_from_args

    args = build_parser().parse_args(["--clients", "1000", "--fraction", "0.1"])
    config = config_from_args(args)
    assert config.encryption.scheme == "bfv"
    assert config.encryption.max_clients == 100
    assert config.encryption.quant_warning is None
    full = config_from_args(build_parser().parse_args(["--clients", "10"]))
    assert full.encryption.max_clients == 10


class FakeGrid:
    """The one Grid method sampling uses, over a given set of node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def _strategy(seed: int, max_clients: int | None = None) -> EncryptedFedAvg:
    fed = FederationConfig(rounds=3, fraction_train=0.1, min_train_clients=1, seed=seed)
    return EncryptedFedAvg(PlainCodec(), 10, fed, node_wait_timeout=0.0, max_clients=max_clients)


def _run_samples(seed: int, id_seed: int, clients: int, stable: bool) -> list[list[str]]:
    """Sample three rounds over clients whose Flower node ids are random per run."""
    rng = np.random.default_rng(id_seed)
    node_ids = [int(x) for x in rng.choice(2**62, size=clients, replace=False)]
    names = {nid: f"client-{k}" for k, nid in enumerate(node_ids)}
    # Flower lists nodes in no particular order: shuffle that too.
    grid = FakeGrid(list(rng.permutation(node_ids)))
    strategy = _strategy(seed)
    if stable:
        strategy.node_order = lambda _grid, ids: {n: names[n] for n in ids}
    return [sorted(names[n] for n in strategy._sample(grid, 0.1, 1)) for _ in range(3)]


def test_sampling_is_reproducible_over_stable_ids():
    """Different random node ids, same stable ids and seed: the same clients each round."""
    first = _run_samples(seed=7, id_seed=1, clients=1000, stable=True)
    second = _run_samples(seed=7, id_seed=2, clients=1000, stable=True)
    assert first == second
    assert all(len(s) == 100 for s in first)
    assert first[0] != first[1]  # rounds differ: the generator advances
    assert _run_samples(seed=8, id_seed=1, clients=1000, stable=True) != first


def test_sampling_by_node_id_is_not_reproducible():
    """Without stable ids the sample follows Flower's random ids (the bug being fixed)."""
    first = _run_samples(seed=7, id_seed=1, clients=1000, stable=False)
    second = _run_samples(seed=7, id_seed=2, clients=1000, stable=False)
    assert first != second


def test_broken_node_order_falls_back_with_a_warning(caplog):
    grid = FakeGrid([5, 3, 9, 1])
    strategy = _strategy(0)
    strategy.node_order = lambda _grid, ids: {n: "same" for n in ids}
    with caplog.at_level(logging.WARNING, logger="sepals"):
        chosen = strategy._sample(grid, 1.0, 1)
    assert chosen == [1, 3, 5, 9]
    assert "not reproducible" in caplog.text and "not distinct" in caplog.text
    strategy.node_order = lambda _grid, ids: {}
    with caplog.at_level(logging.WARNING, logger="sepals"):
        assert strategy._sample(grid, 0.5, 1) != []
    assert "no stable key" in caplog.text


def test_sampling_never_exceeds_max_clients():
    strategy = _strategy(0, max_clients=7)
    assert len(strategy._sample(FakeGrid(list(range(1000))), 0.5, 1)) == 7


def _flower_simulation_grid(clients: int):
    """Flower 1.41's own simulation set-up: in-memory link state, grid, node registration."""
    from flwr.common.constant import RUN_ID_NUM_BYTES, TASK_ID_NUM_BYTES
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    mapping = _register_nodes(clients, factory)  # node id -> partition id, as Flower does
    return grid, mapping


def test_simulation_node_order_matches_flowers_partition_ids():
    """The keys are the partition ids Flower hands each node as ``partition-id``."""
    grid, mapping = _flower_simulation_grid(50)
    ids = sorted(grid.get_node_ids())
    assert sorted(mapping) == ids
    keys = simulation_node_order(grid, ids)
    assert keys == {nid: f"client-{pid}" for nid, pid in mapping.items()}


def test_simulated_sampling_is_reproducible_across_flower_runs():
    """Two Flower simulation set-ups (fresh random node ids), same seed: same clients."""
    picks = []
    for _ in range(2):
        grid, mapping = _flower_simulation_grid(200)
        strategy = _strategy(3)
        strategy.node_order = simulation_node_order
        picks.append([sorted(mapping[n] for n in strategy._sample(grid, 0.1, 1)) for _ in range(3)])
    assert picks[0] == picks[1]
    assert len(picks[0][0]) == 20


def test_simulation_node_order_refuses_other_grids():
    with pytest.raises(TypeError, match="not a simulation grid"):
        simulation_node_order(FakeGrid([1]), [1])  # type: ignore[arg-type]


def test_coarse_quantization_warns_once(caplog):
    from sepals.common import config as config_module

    config_module._warn_once.cache_clear()
    fine = EncryptionConfig(max_clients=100)
    assert fine.quant_warning is None
    with caplog.at_level(logging.WARNING, logger="sepals"):
        coarse = EncryptionConfig(max_clients=1000, plain_modulus_bits=42)
        EncryptionConfig(max_clients=1000, plain_modulus_bits=42)
    assert coarse.quant_warning is not None
    assert "coarse" in coarse.quant_warning
    assert caplog.text.count("BFV quantization is coarse") == 1
    assert coarse.max_quantized < 1024 <= fine.max_quantized
    assert math.isclose(coarse.quant_step, coarse.update_bound / (coarse.max_quantized - 1))
    assert EncryptionConfig(scheme="ckks", max_clients=1000).quant_warning is None


def _report(with_round_zero: bool, target: float | None = 8.0) -> dict:
    rows = [
        {"round": r, "accuracy": 0.1 * r, "loss": 1.0 / r, "epsilon": 2.0 * r if target else None}
        for r in range(1, 4)
    ]
    report = {
        "config": {
            "dataset": "synthetic:1,1",
            "clients": 1000,
            "partition": "iid",
            "codec": "bfv-q2",
            "federation": {"fraction_train": 0.1},
            "privacy": {"target_epsilon": target, "delta": 1e-5},
        },
        "rounds": rows,
    }
    if with_round_zero:
        rows.insert(0, {"round": 0, "accuracy": 0.09, "loss": 2.3, "epsilon": None})
    else:
        report["initial"] = {"accuracy": 0.09, "loss": 2.3}
    return report


@pytest.mark.parametrize("with_round_zero", [True, False])
def test_plots_have_integer_round_ticks_round_zero_and_a_full_title(
    tmp_path, monkeypatch, with_round_zero
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sepals.simulations import plots

    report = _report(with_round_zero)
    rows = plots.plot_rows(report)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    title = plots.plot_title(report)
    assert "epsilon 8" in title and "fraction 0.1" in title and "1000 clients" in title

    captured: list = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", captured.append)  # keep the figures to inspect
    paths = plots.write_plots(report, tmp_path)
    assert [p.name for p in paths] == ["accuracy.png", "epsilon.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    for fig in captured:
        ax = fig.axes[0]
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert 0 in ticks
        xdata = list(ax.get_lines()[0].get_xdata())
        assert xdata == [0, 1, 2, 3]
        assert "fraction 0.1" in ax.get_title()
        real_close(fig)
    eps_line = captured[1].axes[0].get_lines()[0]
    assert eps_line.get_ydata()[0] == 0.0  # no budget spent before round 1


def test_epsilon_plot_says_dp_off_only_when_it_is(tmp_path):
    from sepals.simulations import plots

    off = plots.plot_title(_report(True, target=None))
    assert "DP off" in off
    assert "DP off" not in plots.plot_title(_report(True))
    plots.write_plots(_report(True, target=None), tmp_path)
    assert (tmp_path / "epsilon.png").exists()


def test_an_apps_own_metric_is_plotted_under_its_name(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sepals.simulations import plots

    report = _report(False)
    report["config"]["metric"] = {"name": "r2", "higher_is_better": True}
    report["config"]["dataset"] = "/home/me/work/examples/regression_app.py:make_app"
    report["initial"] = {"loss": 0.9, "metric": -0.2}
    for row in report["rounds"]:
        row["accuracy"], row["metric"] = None, 0.1 * row["round"]
    captured: list = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", captured.append)
    paths = plots.write_plots(report, tmp_path)
    assert [p.name for p in paths] == ["r2.png", "epsilon.png"]
    line = captured[0].axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [0, 1, 2, 3]
    assert list(line.get_ydata()) == pytest.approx([-0.2, 0.1, 0.2, 0.3])
    assert "r2" in captured[0].axes[0].get_ylabel()
    assert captured[0].axes[0].get_title().startswith("regression_app.py:make_app, 1000 clients")
    for fig in captured:
        real_close(fig)
