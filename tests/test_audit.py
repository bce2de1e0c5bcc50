"""The privacy audit: the one-run bound, the gradient canaries, and a broken mechanism caught."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sepals.client.canaries import CanarySpec, ClientCanaries, canary_directions
from sepals.client.privacy import PrivacyLedger
from sepals.client.secret_random import DpRandomness
from sepals.client.training import TrainSettings, dp_schedule, train_round
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.federation import FederationConfig
from sepals.common.models import get_flat
from sepals.simulations.audit import (
    assess,
    canary_scores,
    count_correct,
    epsilon_lower_bound,
    make_canary_spec,
    p_value_dp_audit,
    run_audit,
)

# ------------------------------------------------------------------------- the bound


def test_bound_all_correct_matches_closed_form_without_delta() -> None:
    # With delta = 0 and v = r, the p-value is q^r: eps_lb solves q^r = 0.05.
    for r in (10, 100, 400):
        q = 0.05 ** (1 / r)
        expected = math.log(q / (1 - q))
        assert epsilon_lower_bound(r, r, r, 0.0, 0.95) == pytest.approx(expected, abs=1e-6)


def test_bound_is_zero_at_chance_and_monotone_in_correct_guesses() -> None:
    m, r = 500, 200
    assert epsilon_lower_bound(m, r, r // 2, 1e-5) == 0.0
    assert epsilon_lower_bound(m, r, 0, 1e-5) == 0.0
    bounds = [epsilon_lower_bound(m, r, v, 1e-5) for v in range(100, r + 1, 5)]
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(bounds))
    assert bounds[-1] > bounds[0] + 3


def test_bound_shrinks_with_delta_and_confidence() -> None:
    m, r, v = 500, 100, 95
    assert epsilon_lower_bound(m, r, v, 1e-3) < epsilon_lower_bound(m, r, v, 0.0)
    assert epsilon_lower_bound(m, r, v, 1e-5, 0.99) < epsilon_lower_bound(m, r, v, 1e-5, 0.95)


def test_p_value_known_values_and_errors() -> None:
    # eps = 0: a fair coin per guess.
    assert p_value_dp_audit(10, 10, 10, 0.0, 0.0) == pytest.approx(0.5**10)
    assert p_value_dp_audit(10, 4, 0, 1.0, 0.0) == 1.0
    # The delta term is 2 m delta alpha, alpha from the binomial pmf's partial sums.
    q = 1 / (1 + math.exp(-1.0))
    with_delta = p_value_dp_audit(100, 10, 9, 1.0, 1e-3)
    no_delta = p_value_dp_audit(100, 10, 9, 1.0, 0.0)
    assert no_delta == pytest.approx(10 * q**9 * (1 - q) + q**10)
    assert with_delta > no_delta
    for bad in ((5, 6, 1, 1.0, 0.0), (5, 3, 4, 1.0, 0.0), (5, 3, 1, -1.0, 0.0)):
        with pytest.raises(ValueError):
            p_value_dp_audit(*bad)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(10, 10, 10, 0.0, 1.0)


def test_guesses_and_scores() -> None:
    included = np.array([True, False, True, False, True, False])
    scores = np.array([5.0, -1.0, 3.0, 0.5, -2.0, 0.0])
    # top 2 (0, 2) are in; bottom 2 (4, 1): 4 is in (wrong), 1 out (right)
    assert count_correct(scores, included, 2) == 3
    with pytest.raises(ValueError):
        count_correct(scores, included, 4)
    dirs = canary_directions(3, 4, 7)
    assert np.allclose(np.linalg.norm(dirs, axis=1), 1.0)
    theta0 = np.zeros(7)
    assert np.allclose(canary_scores(theta0, -2 * dirs[1], dirs)[1], 2.0)


def test_assess_separable_scores_give_a_large_bound() -> None:
    rng = np.random.default_rng(0)
    included = rng.random(400) < 0.5
    separable = assess(included * 10.0 + rng.normal(size=400), included, 1e-5, 1.0)
    chance = assess(rng.normal(size=400), included, 1e-5, 1.0)
    assert separable.epsilon_lower_bound > 3.0
    assert chance.epsilon_lower_bound < 1.0
    assert separable.correct <= separable.guesses <= 400
    assert "Binomial" in separable.formula and "Bonferroni" in separable.confidence_method


# ------------------------------------------------------------------------- the spec


def test_canary_spec_is_seeded_picklable_data() -> None:
    import pickle

    spec = make_canary_spec(7, 400, 30, 5)
    assert spec == make_canary_spec(7, 400, 30, 5)
    assert spec != make_canary_spec(8, 400, 30, 5)
    assert pickle.loads(pickle.dumps(spec)) == spec
    inc = spec.included()
    assert 150 < inc.sum() < 250
    assert set(spec.holders) == set(range(5))
    # every canary, in or out, is a row: inclusion changes no client's size
    assert sum(spec.per_client(5)) == 400
    assert not spec.broken_no_noise_for_tests
    mine = spec.for_client(2)
    assert len(mine.ids) == spec.per_client(5)[2]
    live = inc[list(mine.ids)]
    dirs = canary_directions(7, 400, 30)[list(mine.ids)]
    assert np.allclose(mine.directions[live], dirs[live])
    assert not mine.directions[~live].any()  # left-out canaries are null rows
    with pytest.raises(ValueError):
        make_canary_spec(7, 1, 30, 5)
    with pytest.raises(ValueError):
        CanarySpec(0, 3, (0, -2), (True, False))
    with pytest.raises(ValueError, match="inclusion"):
        CanarySpec(0, 3, (0, 1), (True,))
    with pytest.raises(ValueError, match="distinct"):
        CanarySpec(0, 3, (0, 1), (True, True), (2, 2))


def test_dirac_canaries_sit_on_the_quietest_parameters() -> None:
    from sepals.simulations.audit import quiet_coordinates

    spec = make_canary_spec(1, 3, 23, 2, coordinates=(4, 0, 9))
    dirs = spec.directions()
    assert np.allclose(dirs @ dirs.T, np.eye(3)) and dirs[0, 4] == 1.0
    # Input feature 0 is always zero: the 3 first-layer weights it feeds get no gradient.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 4, generator=gen)
    x[:, 0] = 0.0
    data = TensorDataset(x, torch.randint(0, 2, (100,), generator=gen))
    quiet = quiet_coordinates(_model, get_flat(_model()), data, 3, 0)
    assert sorted(quiet) == [0, 4, 8]  # weight[h, 0] of a 3x4 Linear: flat 4 * h
    assert quiet_coordinates(_model, get_flat(_model()), data, 3, 1) != ()
    with pytest.raises(ValueError):
        quiet_coordinates(_model, get_flat(_model()), data, 24, 0)


# ------------------------------------------------------------------------- injection


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _ledger(privacy: PrivacyConfig, n: int, settings: TrainSettings) -> PrivacyLedger:
    q, steps = dp_schedule(n, settings)
    return PrivacyLedger.empty(privacy).calibrated(privacy, q, steps, 1)


@dataclass(frozen=True, eq=False)
class _Counting(ClientCanaries):
    seen: list[int] = field(default_factory=list)

    def strip(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = super().strip(x, y)
        self.seen.append(len(self._sampled))
        return out


def test_a_sampled_canary_moves_the_model_by_exactly_c_u_without_noise() -> None:
    # One canary and no real example: q = 1, so every step samples it; momentum 0, lr 1.
    privacy = PrivacyConfig(target_epsilon=1.0, max_grad_norm=0.5)
    settings = TrainSettings(
        batch_size=4, learning_rate=1.0, momentum=0.0, randomness=DpRandomness(1)
    )
    dim = sum(p.numel() for p in _model().parameters())
    u = canary_directions(0, 1, dim)
    canaries = ClientCanaries((0,), u, no_noise=True)
    data = canaries.add_rows(TensorDataset(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long)))
    ledger = _ledger(privacy, len(data), settings)
    assert ledger.noise_multiplier is not None and ledger.noise_multiplier > 1.0
    theta0 = get_flat(_model())
    out = train_round(_model, None, data, settings, privacy, ledger, 1)
    assert out.steps == 1 and out.num_examples == 1
    assert np.allclose(theta0 - out.weights, 0.5 * u[0], atol=1e-5)
    # The ledger records the calibrated sigma: the broken switch claims the budget.
    assert out.ledger.history[-1][0] == ledger.noise_multiplier
    # With the noise on, the same step is far from C*u.
    honest = ClientCanaries((0,), u).add_rows(
        TensorDataset(torch.zeros((0, 4)), data.tensors[1][:0])
    )
    noisy = train_round(_model, None, honest, settings, privacy, ledger, 1)
    assert np.linalg.norm(theta0 - noisy.weights - 0.5 * u[0]) > 1.0


def test_a_left_out_canary_is_a_null_row_that_changes_neither_size_nor_model() -> None:
    """Inclusion changes no example count, sample rate or sigma: only the gradient."""
    privacy = PrivacyConfig(target_epsilon=1.0, max_grad_norm=0.5)
    settings = TrainSettings(
        batch_size=4, learning_rate=1.0, momentum=0.0, randomness=DpRandomness(1)
    )
    dim = sum(p.numel() for p in _model().parameters())
    spec = CanarySpec(0, dim, (0, 0), (True, False), coordinates=(3, 7))
    mine = spec.for_client(0)
    empty = TensorDataset(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long))
    data = ClientCanaries(mine.ids, mine.directions, no_noise=True).add_rows(empty)
    ledger = _ledger(privacy, len(data), settings)
    out = train_round(_model, None, data, settings, privacy, ledger, 1)
    moved = get_flat(_model()) - out.weights
    assert out.num_examples == 2 and ledger.sample_rate == 1.0
    assert moved[3] == pytest.approx(0.25, abs=1e-6)  # C * u / expected batch 2
    assert abs(moved[7]) < 1e-7 and np.count_nonzero(np.abs(moved) > 1e-7) == 1


def test_canaries_are_poisson_sampled_at_the_step_rate() -> None:
    privacy = PrivacyConfig(target_epsilon=8.0)
    settings = TrainSettings(epochs=5, batch_size=25, randomness=DpRandomness(3))
    gen = torch.Generator().manual_seed(0)
    real = TensorDataset(torch.randn(200, 4, generator=gen), torch.randint(0, 2, (200,)))
    k = 50
    canaries = _Counting(tuple(range(k)), canary_directions(0, k, 23))
    data = canaries.add_rows(real)
    assert len(data) == 250
    ledger = _ledger(privacy, len(data), settings)
    q = ledger.sample_rate
    assert q == pytest.approx(0.1)
    out = train_round(_model, None, data, settings, privacy, ledger, 1)
    rate = sum(canaries.seen) / (out.steps * k)
    assert out.steps == 50 and out.num_examples == 250
    assert abs(rate - q) < 0.025  # 2500 Bernoulli(0.1) draws: sd 0.006


def test_canary_rows_need_tensor_data_with_labels() -> None:
    c = ClientCanaries((0,), canary_directions(0, 1, 5))
    with pytest.raises(ValueError, match="TensorDataset"):
        c.add_rows(TensorDataset(torch.zeros(3, 4)))
    with pytest.raises(ValueError, match="labels"):
        c.add_rows(TensorDataset(torch.zeros(3, 4), torch.tensor([0, -1, 1])))
    x, y = c.add_rows(TensorDataset(torch.ones(3, 4), torch.tensor([0, 1, 1]))).tensors
    assert y.tolist() == [0, 1, 1, -1] and float(x[3].abs().sum()) == 0.0


def test_canaries_wrap_the_training_data_only_in_an_audit() -> None:
    from sepals.client.canaries import CanaryData
    from sepals.common.partition import client_train_sizes
    from sepals.common.plan import FederationPlan
    from sepals.common.round_signature import generate_operator_key
    from sepals.common.scheme import make_client_codec
    from sepals.simulations.clients import SimulatedClientProvider, simulated_runtime
    from sepals.simulations.config import bundled_source

    fed = FederationConfig(rounds=2)
    codec = make_client_codec(EncryptionConfig(scheme="none"), None)
    plan = FederationPlan.create(
        fed, codec.name, codec.fingerprint_hex, 10, generate_operator_key()[1]
    )
    base = SimulatedClientProvider(
        bundled_source("digits", 4, "iid", 0),
        4,
        "iid",
        0,
        PrivacyConfig(),
        EncryptionConfig(scheme="none"),
        None,
        plan,
    )
    sizes = client_train_sizes("digits", 4, "iid", 0)
    plain = simulated_runtime(base, 1)
    assert not isinstance(plain.train_data, CanaryData) and len(plain.train_data) == sizes[1]
    spec = make_canary_spec(0, 40, 10, 4)
    audited = simulated_runtime(SimulatedClientProvider(**{**base.__dict__, "canaries": spec}), 1)
    assert isinstance(audited.train_data, CanaryData)
    assert audited.train_data.canaries.ids == spec.for_client(1).ids
    assert len(audited.train_data) == sizes[1] + spec.per_client(4)[1]


def test_canaries_wrap_any_dataset_of_labelled_pairs() -> None:
    from torch.utils.data import Subset

    c = ClientCanaries((0, 1), canary_directions(0, 2, 5))
    base = TensorDataset(torch.arange(12.0).reshape(6, 2), torch.tensor([0, 1, 2, 0, 1, 2]))
    from_subset = c.add_rows(Subset(base, [4, 1]))
    assert from_subset.tensors[1].tolist() == [1, 1, -1, -2]
    assert from_subset.tensors[0][:2].tolist() == [[8.0, 9.0], [2.0, 3.0]]

    class Pairs(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.full((2,), float(i)), i

    from_pairs = c.add_rows(Pairs())
    assert from_pairs.tensors[1].tolist() == [0, 1, 2, -1, -2]
    with pytest.raises(ValueError, match="labels"):
        c.add_rows(TensorDataset(torch.zeros(3, 2), torch.tensor([0.5, 1.0, 2.0])))


def test_run_audit_refuses_what_it_cannot_audit(tmp_path: Path) -> None:
    from sepals.simulations.config import SimulationConfig

    off = SimulationConfig(privacy=PrivacyConfig(target_epsilon=None), out=str(tmp_path))
    with pytest.raises(ValueError, match="DP on"):
        run_audit(off, 10)


# ------------------------------------------------------------------------- end to end


def _small(tmp_path: Path, name: str) -> object:
    from sepals.simulations.config import SimulationConfig

    return SimulationConfig(
        dataset="digits",
        clients=2,
        federation=FederationConfig(
            rounds=3, min_train_clients=1, batch_size=16, learning_rate=0.2, seed=0
        ),
        privacy=PrivacyConfig(target_epsilon=1.0),
        encryption=EncryptionConfig(scheme="none", max_clients=2),
        out=str(tmp_path / name),
        cpus=2,
    )


@pytest.mark.slow
def test_audit_catches_a_broken_mechanism_and_passes_an_honest_one(tmp_path: Path) -> None:
    import dataclasses

    from e2e_util import EXAMPLE

    # The broken run audits an own app (the example edge app's model and data, split
    # by sepals); the honest one the bundled dataset: both go through the same path.
    own_app = dataclasses.replace(
        _small(tmp_path, "broken"),  # type: ignore[type-var]
        app=f"{EXAMPLE}:make_app",
        app_args=(("partitions", "1"),),
    )
    broken = run_audit(own_app, 200, _broken_no_noise_for_tests=True)
    honest = run_audit(_small(tmp_path, "honest"), 200)
    assert broken["config"]["app"].endswith("edge_app.py:make_app")
    b, h = broken["audit"], honest["audit"]
    assert b["claimed_epsilon"] <= 1.0 + 1e-6 and h["claimed_epsilon"] <= 1.0 + 1e-6
    assert b["broken_no_noise_for_tests"] and not h["broken_no_noise_for_tests"]
    assert b["epsilon_lower_bound"] >= 1.5
    assert h["epsilon_lower_bound"] <= h["claimed_epsilon"]
    # The one-shot estimate refutes the broken claim and not the honest one.
    assert b["one_shot_epsilon"] > b["claimed_epsilon"] and b["refuted"]
    assert h["one_shot_epsilon"] <= h["claimed_epsilon"] and not h["refuted"]
    assert (tmp_path / "broken" / "report.json").read_text().count('"audit"') == 1


def test_cli_audit_flag_refuses_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    from sepals.simulations.cli import main

    assert main(["--audit", "1"]) == 2
    assert "M >= 2" in capsys.readouterr().err
    assert main(["--audit", "10", "--epsilon", "0"]) == 2
    assert "--epsilon > 0" in capsys.readouterr().err
