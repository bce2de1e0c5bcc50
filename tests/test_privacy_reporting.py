"""What a client reveals beside epsilon: replace-one epsilon from the enforced accountant,
delta against 1/n, and the labels every printed epsilon carries."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_util import plain_plan, train_toy_rounds
from torch.utils.data import TensorDataset

from sepals.client import training
from sepals.client.core import ClientRuntime, SepalsClient, train_metrics
from sepals.client.failures import vetted_reason
from sepals.client.privacy import (
    PrivacyLedger,
    compute_epsilon,
    rdp_replace_one_epsilon,
    replace_one_epsilon_of,
)
from sepals.client.secret_random import DpRandomness
from sepals.client.training import TrainSettings
from sepals.common.accounting import (
    RELATIONS_DOC,
    check_delta,
    delta_problem,
    epsilon_pair,
    pld_epsilon,
    summary_epsilon,
)
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.errors import DeltaTooLargeError
from sepals.common.ledger import LedgerFileError, read_ledger_file
from sepals.common.protocol import RoundConfig
from sepals.simulations.cli import main as sim_main

PRIVACY = PrivacyConfig(target_epsilon=4.0, delta=1e-3)


def test_the_ledger_composes_replace_one_epsilon_beside_zero_out(tmp_path: Path) -> None:
    settings = TrainSettings(batch_size=20, learning_rate=0.05, randomness=DpRandomness(1))
    ledger, _, _ = train_toy_rounds(PRIVACY, settings, planned=3, rounds=2)
    golden = pld_epsilon(ledger.history, ledger.delta, replace_one=True, discretization=1e-2)
    assert ledger.replace_one_epsilon == pytest.approx(golden, rel=1e-12)
    assert ledger.epsilon is not None and ledger.replace_one_epsilon > ledger.epsilon
    path = tmp_path / "ledger.json"
    ledger.save(path, "c")
    again = PrivacyLedger.load(path, PRIVACY)
    assert again.replace_one_epsilon == ledger.replace_one_epsilon
    assert PrivacyLedger.empty(PRIVACY).replace_one_epsilon == 0.0
    assert PrivacyLedger.empty(PrivacyConfig(target_epsilon=None)).replace_one_epsilon is None
    # a ledger written before replace-one epsilon was kept still loads
    doc = read_ledger_file(path)["ledger"]
    del doc["replace_one_epsilon"]
    assert PrivacyLedger.from_dict(doc).replace_one_epsilon is None


def test_an_rdp_ledger_reports_replace_one_from_rdp_not_from_pld() -> None:
    """Both epsilons of a ledger come from the accountant that enforces its budget."""
    privacy = PrivacyConfig(target_epsilon=4.0, delta=1e-3, accountant="rdp")
    settings = TrainSettings(batch_size=20, learning_rate=0.05, randomness=DpRandomness(1))
    ledger, _, _ = train_toy_rounds(privacy, settings, planned=3, rounds=2)
    assert ledger.epsilon == compute_epsilon("rdp", ledger.history, ledger.delta)
    expected = rdp_replace_one_epsilon(ledger.history, ledger.delta)
    assert ledger.replace_one_epsilon == expected
    pld = pld_epsilon(ledger.history, ledger.delta, replace_one=True, discretization=1e-2)
    # Group privacy over two zero-out steps is a valid bound, looser than PLD's.
    assert ledger.epsilon is not None and expected > pld > ledger.epsilon


def test_the_group_privacy_bound_meets_its_delta() -> None:
    """An independent check of the RDP replace-one bound: 2 eps' at a delta' whose group
    delta (1 + e^eps') delta' is within the target, and no looser than it must be."""
    from opacus.accountants.analysis import rdp

    history = ((1.1, 0.05, 400),)
    delta = 1e-5
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    total = rdp.compute_rdp(q=0.05, noise_multiplier=1.1, steps=400, orders=orders)
    got = rdp_replace_one_epsilon(history, delta)
    best = math.inf
    for exponent in np.linspace(math.log(delta) - 30, math.log(delta), 3000):
        d = math.exp(exponent)
        eps, _ = rdp.get_privacy_spent(orders=orders, rdp=total, delta=d)
        if (1 + math.exp(eps)) * d <= delta:
            best = min(best, 2 * eps)
    assert got == pytest.approx(best, rel=2e-3)


def test_replace_one_epsilon_without_noise_is_infinite_and_not_sent() -> None:
    for accountant in ("pld", "rdp"):
        assert replace_one_epsilon_of(accountant, ((0.0, 0.1, 5),), 1e-5) == math.inf
        assert replace_one_epsilon_of(accountant, (), 1e-5) == 0.0
        assert replace_one_epsilon_of(accountant, ((1.0, 0.1, 0),), 1e-5) == 0.0
    ledger = dataclasses.replace(
        PrivacyLedger.empty(PRIVACY), epsilon=2.0, replace_one_epsilon=math.inf
    )
    outcome = training.TrainOutcome(
        weights=np.zeros(3), num_examples=5, steps=1, mean_loss=0.0, seconds=0.0, ledger=ledger
    )
    assert "epsilon-replace-one" not in train_metrics(outcome, None)
    finite = dataclasses.replace(ledger, replace_one_epsilon=3.0)
    sent = train_metrics(dataclasses.replace(outcome, ledger=finite), None)
    assert sent["epsilon-replace-one"] == 3.0 and sent["epsilon"] == 2.0


def test_a_ledger_file_with_a_bad_replace_one_epsilon_is_refused(tmp_path: Path) -> None:
    ledger = dataclasses.replace(PrivacyLedger.empty(PRIVACY), replace_one_epsilon=-1.0)
    with pytest.raises(LedgerFileError, match="replace_one_epsilon"):
        ledger.save(tmp_path / "l.json", "c")


def test_delta_must_lie_below_one_over_n() -> None:
    assert delta_problem(1e-5, 1000) is None
    assert delta_problem(1e-3, 1000) is not None  # delta * n = 1
    message = delta_problem(0.05, 50)
    assert message is not None and "not below 1/n = 0.02" in message
    check_delta(1e-5, [100, 200])
    with pytest.raises(ValueError, match=r"2 of 3 clients, e\.g\. client-1: delta 0\.01 .* 100 "):
        check_delta(0.01, [500, 100, 50])


def _client(n: int, delta: float, noise_shares: int = 1) -> tuple[SepalsClient, RoundConfig]:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 4, generator=gen), torch.randint(0, 2, (n,), generator=gen))
    plan = plain_plan(10)
    if noise_shares != 1:
        plan = dataclasses.replace(
            plan, noise_shares=noise_shares, mask_neighbours=2, mask_threshold=2
        )
    runtime = ClientRuntime(
        client_id="c",
        model_factory=lambda: torch.nn.Linear(4, 2),
        train_data=data,
        test_data=None,
        privacy=PrivacyConfig(target_epsilon=8.0, delta=delta),
        encryption=EncryptionConfig(scheme="none"),
        plan=plan,
    )
    cfg = RoundConfig(
        server_round=1,
        rounds=plan.rounds,
        fraction_train=plan.fraction_train,
        local_epochs=plan.local_epochs,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        momentum=plan.momentum,
        model_seed=plan.model_seed,
        codec=plan.codec,
        key_fingerprint=plan.key_fingerprint,
        vector_length=plan.vector_length,
    )
    return SepalsClient(runtime), cfg


def test_a_client_refuses_to_train_when_delta_is_not_below_one_over_n() -> None:
    client, cfg = _client(n=40, delta=0.05)
    ledger = PrivacyLedger.empty(client.runtime.privacy)
    with pytest.raises(DeltaTooLargeError, match="not below 1/n") as info:
        client.train(cfg, None, ledger)
    _, reason = vetted_reason(info.value)
    assert reason == "delta not below 1/n for this client's data"
    client, cfg = _client(n=40, delta=1e-3)
    assert client.train(cfg, None, ledger).metrics["epsilon"] <= 8.0


def test_every_printed_epsilon_names_its_relation_and_points_to_the_explanation() -> None:
    assert epsilon_pair(7.991, 13.628) == "7.991 zero-out, 13.628 replace-one"
    assert epsilon_pair(None, None) == "off"
    line = summary_epsilon({"epsilon": 7.991, "epsilon_replace_one": 8.1})
    assert "zero-out" in line and "replace-one" in line and RELATIONS_DOC in line
    assert "x the zero-out" not in line  # within 25%: no flag
    flagged = summary_epsilon({"epsilon": 4.0, "epsilon_replace_one": 8.4})
    assert "2.1x the zero-out epsilon" in flagged
    seeded = summary_epsilon({"epsilon": 4.0, "epsilon_replace_one": 4.2, "epsilon_holds": False})
    assert "EPSILON DOES NOT HOLD" in seeded
    doc = (Path(__file__).resolve().parents[1] / RELATIONS_DOC.split("#")[0]).read_text()
    assert "## Neighbouring relations" in doc and "r1" not in doc.split()


def test_sepals_sim_refuses_delta_not_below_one_over_n(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The digits clients hold about 144 training examples each.
    assert sim_main(["--delta", "0.01", "--rounds", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "10 of 10 clients" in err and "not below 1/n" in err
