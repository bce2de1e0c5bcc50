"""A simulation with a private explanation round writes its maps, plot and report entry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sepals.client.privacy import PrivacyLedger, compute_epsilon
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.explain_spec import ExplanationSpec
from sepals.common.federation import FederationConfig
from sepals.simulations.config import SimulationConfig
from sepals.simulations.harness import run_experiment

pytestmark = pytest.mark.slow


def test_a_simulation_with_explain_writes_the_private_and_central_maps(tmp_path):
    budget = PrivacyConfig(target_epsilon=4.0)
    config = SimulationConfig(
        dataset="digits",
        clients=2,
        federation=FederationConfig(
            rounds=1, min_train_clients=1, explanation=ExplanationSpec(epsilon=1.0)
        ),
        privacy=budget,
        encryption=EncryptionConfig(),
        out=str(tmp_path / "run"),
        cpus=2,
    )
    report = run_experiment(config)
    out = tmp_path / "run"
    entry = report["explanation"]
    assert json.loads((out / "report.json").read_text())["explanation"] == entry
    assert entry["released"] and entry["clients"] == 2 and entry["examples"] > 0
    assert (entry["targets"], entry["features"], entry["method"]) == (10, 64, "saliency")
    assert entry["openers"] == {"asked": 2, "agreeing": 2}
    assert entry["epsilon"] == 1.0 and 0 < entry["max_epsilon_total"] <= 4.0
    assert sorted(entry["epsilon_total"]) == ["client-0", "client-1"]
    assert entry["cosine_to_central"]["mean"] > 0.5
    assert (out / "explanation.png").stat().st_size > 0
    doc = json.loads((out / "explanation.json").read_text())
    private = np.asarray(doc["private"]["mean"])
    central = np.asarray(doc["central"]["mean"])
    assert private.shape == central.shape == (10, 64)
    # each client's total epsilon: its training and the release, recomputed, within budget
    for path in sorted((out / "ledgers").glob("*.json")):
        ledger = PrivacyLedger.load(path, budget)
        assert ledger.explanations == (1,)
        assert ledger.epsilon == compute_epsilon("pld", ledger.history, 1e-5) <= 4.0
        assert entry["epsilon_total"][path.stem] == ledger.epsilon
