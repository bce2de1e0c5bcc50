"""End-to-end simulations on Flower's Ray backend (tens of seconds each)."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType

from sepals.client.privacy import PrivacyLedger, compute_epsilon, replace_one_epsilon_of
from sepals.common.accounting import pld_epsilon
from sepals.common.codec import PlainCodec
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.federation import FederationConfig
from sepals.common.protocol import KEY_UPDATE
from sepals.common.records import KEY_PAYLOAD, payload_array, payload_from_array
from sepals.common.scheme import generate_secret_context, make_client_codec
from sepals.simulations.config import SimulationConfig
from sepals.simulations.harness import run_experiment
from sepals.simulations.report import summarize

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, clients: int, rounds: int, **kw) -> SimulationConfig:
    return SimulationConfig(
        dataset="digits",
        clients=clients,
        federation=FederationConfig(rounds=rounds, min_train_clients=1, fraction_evaluate=1.0),
        privacy=PrivacyConfig(target_epsilon=4.0),
        encryption=EncryptionConfig(),
        out=str(tmp_path / "run"),
        cpus=2,
        **kw,
    )


def test_three_clients_two_rounds_end_to_end(tmp_path):
    rows = []
    report = run_experiment(_config(tmp_path, clients=3, rounds=2), progress=rows.append)
    out = tmp_path / "run"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["final"] == report["final"]
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "epsilon.png").stat().st_size > 0
    assert [r["round"] for r in rows] == [1, 2]
    for row in report["rounds"]:
        assert row["clients_accepted"] == 3 and row["clients_excluded"] == 0
        assert 0.0 <= row["accuracy"] <= 1.0 and np.isfinite(row["loss"])
        assert row["upload_bytes"] > 0 and row["seconds"] > 0
        assert row["federated_accuracy"] is not None
    # round 1 trains the seeded model: only the evaluation broadcast carries a global model;
    # round 2 sends it for training and for evaluation
    down = [r["download_bytes"] for r in report["rounds"]]
    assert down[0] > 0 and down[1] == 2 * down[0]
    assert report["config"]["codec"] == "bfv-q2"
    # the 2,410-parameter model fits one N = 4096 ciphertext: keys and report use that ring
    assert report["config"]["encryption"]["poly_modulus_degree"] == 4096
    assert report["config"]["model"]["he_ring"] == {
        "poly_modulus_degree": 4096,
        "ciphertexts_per_update": 1,
    }
    # the codec and its quantization error are reported every round
    for row in report["rounds"]:
        assert row["codec"] == "bfv-q2"
        assert 0 < row["quant_error"] <= report["config"]["encryption"]["quant_step"]
    assert report["final"]["max_quant_error"] == max(r["quant_error"] for r in report["rounds"])
    # epsilon is honest: recomputed from the reported sigma, q and steps
    assert len(report["clients"]) == 3
    for c in report["clients"]:
        assert c["rounds_participated"] == 2
        recomputed = compute_epsilon(
            c["accountant"], ((c["noise_multiplier"], c["sample_rate"], c["steps"]),), 1e-5
        )
        assert c["epsilon"] == pytest.approx(recomputed, rel=1e-9)
        assert 0 < c["epsilon"] <= 4.0
    assert report["final"]["epsilon"] == max(c["epsilon"] for c in report["clients"])
    # replace-one epsilon (which also covers the example count) beside it, per client,
    # per round and in the summary; each client's ledger is on disk, as in a deployment
    for c in report["clients"]:
        assert c["epsilon_replace_one"] == pytest.approx(
            replace_one_epsilon_of(
                c["accountant"], ((c["noise_multiplier"], c["sample_rate"], c["steps"]),), 1e-5
            )
        )
        history = ((c["noise_multiplier"], c["sample_rate"], c["steps"]),)
        assert c["epsilon_replace_one"] > pld_epsilon(history, 1e-5, replace_one=False)
        ledger = PrivacyLedger.load(out / "ledgers" / f"{c['id']}.json", PrivacyConfig(4.0))
        assert ledger.epsilon == c["epsilon"] and ledger.rounds == (1, 2)
        assert stat.S_IMODE((out / "ledgers" / f"{c['id']}.json").stat().st_mode) == 0o600
    final = report["final"]
    assert final["epsilon_replace_one"] == max(c["epsilon_replace_one"] for c in report["clients"])
    by_round = [r["epsilon_replace_one"] for r in report["rounds"]]
    assert by_round == sorted(by_round) and by_round[-1] == final["epsilon_replace_one"]
    line = summarize(report)
    pair = f"{final['epsilon']:.3f} zero-out, {final['epsilon_replace_one']:.3f} replace-one"
    assert pair in line
    assert "docs/privacy.md#neighbouring-relations" in line and "DOES NOT HOLD" not in line
    assert final["dp_randomness"].startswith("secret: AES-128-CTR")
    assert final["epsilon_holds"] is True and final["neighbouring_relation"] == "zero-out"
    assert final["federated_evaluation"].startswith("on (1 of nodes a round)")
    # the clients' key file is private to its owner
    mode = stat.S_IMODE((out / "keys" / "clients.secret").stat().st_mode)
    assert mode == 0o600
    # fairness: the final model on every client's own test split, in rows and report
    fair = report["final"]["fairness"]
    values = fair["clients"]
    assert sorted(values) == ["client-0", "client-1", "client-2"] and fair["count"] == 3
    assert (fair["min"], fair["max"]) == (min(values.values()), max(values.values()))
    # the client test splits partition the held-out split: global accuracy lies between
    assert fair["min"] <= report["final"]["accuracy"] <= fair["max"]
    assert all(row["fairness"]["count"] == 3 for row in report["rounds"])
    assert (out / "accuracy_clients.png").stat().st_size > 0
    # the clients' own federated evaluation of the same model gives the same spread
    federated = report["server_log"][-1]["federated_spread"]
    for key in ("min", "median", "max", "worst10_mean"):
        assert federated[key] == pytest.approx(fair[key])


class FaultyClients:
    """A client mod that corrupts the replies of partitions 0, 1 and 2."""

    def __call__(self, msg: Message, context: Context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        pid = int(context.node_config["partition-id"])
        payload = payload_from_array(reply.content[KEY_UPDATE][KEY_PAYLOAD])
        if pid == 0:  # truncated ciphertext
            bad = payload[: len(payload) // 2]
        elif pid == 1:  # ciphertext under a foreign key
            cfg = EncryptionConfig()
            bad = make_client_codec(cfg, generate_secret_context(cfg)).encode(np.ones(10))
        elif pid == 2:  # plaintext of the wrong length
            bad = PlainCodec().encode(np.ones(10))
        else:
            return reply
        reply.content[KEY_UPDATE] = ArrayRecord({KEY_PAYLOAD: payload_array(bad)})
        return reply


def test_bad_clients_are_excluded_and_rounds_go_on(tmp_path):
    config = _config(tmp_path, clients=4, rounds=2)
    # Masked with T = 1, so that the one good client's update can be unmasked alone (the
    # default T = 3 of 3 neighbours abandons a round with a single survivor): the three
    # excluded clients' pairwise masks come off with their rebuilt mask keys.
    fed = dataclasses.replace(config.federation, mask_neighbours=3, mask_threshold=1)
    config = dataclasses.replace(config, federation=fed)
    report = run_experiment(config, client_mods=[FaultyClients()])
    for row in report["rounds"]:
        assert row["clients_accepted"] == 1
        assert row["clients_excluded"] == 3
    reasons = [r for log in report["server_log"] for _, r in log["excluded"]]
    assert sum("MalformedPayloadError" in r for r in reasons) == 4  # truncated, plain x2 rounds
    assert sum("ForeignKeyError" in r for r in reasons) == 2
    assert [c["id"] for c in report["clients"]] == ["client-3"]
    # each round's aggregate is exactly the good client's weighted update
    good = report["clients"][0]["num_examples"] / report["config"]["federation"]["weight_cap"]
    assert [log["weight_total"] for log in report["server_log"]] == [good, good]
    assert [row["mask"]["removed"] for row in report["rounds"]] == [True, True]
    assert [row["mask"]["dropouts"] for row in report["rounds"]] == [3, 3]


def test_clients_refuse_rounds_past_their_budget(tmp_path):
    """sigma fixed at 1.0, target epsilon 3: one round (2.85) fits, a second (3.45) does not."""
    config = SimulationConfig(
        dataset="digits",
        clients=3,
        federation=FederationConfig(rounds=3, min_train_clients=1, batch_size=32),
        privacy=PrivacyConfig(target_epsilon=3.0, noise_multiplier=1.0, accountant="rdp"),
        encryption=EncryptionConfig(),
        out=str(tmp_path / "run"),
        cpus=2,
    )
    report = run_experiment(config)
    accepted = [r["clients_accepted"] for r in report["rounds"]]
    declined = [r["clients_declined"] for r in report["rounds"]]
    assert accepted == [3, 0, 0] and declined == [0, 3, 3]
    reasons = [r for log in report["server_log"] for _, r in log["declined"]]
    assert all("privacy budget exhausted" in r and "> target 3" in r for r in reasons)
    # no global model came out of rounds 2 and 3, so the accuracy stays put
    assert report["rounds"][1]["accuracy"] == report["rounds"][0]["accuracy"]
    for c in report["clients"]:
        assert c["rounds_participated"] == 1
        assert c["epsilon"] == pytest.approx(2.8504, abs=1e-3) and c["epsilon"] <= 3.0
