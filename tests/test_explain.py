"""Explanations: local attributions, and the private explanation round end to end in-process.

The round runs through the real Message-API path (the strategy's explanation phase and
the sepals ClientApp, over an in-process grid) with a tiny model, BFV and masking for
training; the DP parts are checked statistically and against an independent accountant.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from grid_util import LossyGrid
from torch import nn
from torch.utils.data import TensorDataset

import sepals
from sepals.client.app import LEDGER_STATE_KEY, make_client_app
from sepals.client.core import ClientRuntime, SepalsClient
from sepals.client.epsilon import compute_epsilon, release_noise_multiplier
from sepals.client.explain_round import (
    encode_release,
    noisy_sum,
    open_release,
    release_unit,
)
from sepals.client.privacy import PrivacyLedger
from sepals.client.secret_random import DpRandomness
from sepals.common.bfv import BfvCodec
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.errors import BudgetExhaustedError, ExplanationRejectedError
from sepals.common.explain import attribute, clip_rows
from sepals.common.explain_spec import EXPLAIN_OPEN, ExplanationSpec
from sepals.common.federation import FederationConfig
from sepals.common.masking import masked_federation
from sepals.common.plan import FederationPlan
from sepals.common.protocol import ERR_BAD_GLOBAL
from sepals.common.records import GlobalModel, global_record, read_global_model
from sepals.common.seal_bundle import generate_bfv_bundle, public_bfv_bundle
from sepals.server.serverapp.strategy import EncryptedFedAvg
from sepals.simulations.harness import simulated_plan

ENC = EncryptionConfig(max_clients=8)
PRIVACY = PrivacyConfig(target_epsilon=8.0, accountant="rdp")
FEATURES, CLASSES = 4, 3
LENGTH = FEATURES * CLASSES + CLASSES
SPEC = ExplanationSpec(epsilon=1.0, clip=1.0, targets=CLASSES, features=FEATURES)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, CLASSES)


@pytest.fixture(scope="module")
def bundle() -> bytes:
    return generate_bfv_bundle(ENC)


# ------------------------------------------------------------------ local explanations
def test_local_explanations_of_a_tiny_model(tmp_path: Any) -> None:
    model = _model()
    x = torch.randn(5, FEATURES)
    weight = model.weight.detach()
    # Integrated Gradients from a zero baseline on a linear model is exactly x * w_target.
    ig = sepals.explain(model, x, 2)
    np.testing.assert_allclose(ig.attributions, (x * weight[2]).numpy(), atol=1e-5)
    assert ig.targets == (2,) * 5 and ig.method == "integrated_gradients"
    saliency = sepals.explain(model, x, 1, method="saliency")
    np.testing.assert_allclose(saliency.attributions, weight[1].expand(5, -1).numpy(), atol=1e-6)
    for method in ("gradient_shap", "kernel_shap", "lime"):
        got = sepals.explain(model, x[:2], method=method, steps=16)
        assert got.attributions.shape == (2, FEATURES) and np.isfinite(got.attributions).all()
    # no target: each input's top prediction
    top = sepals.explain(model, x)
    assert top.targets == top.predictions == tuple(model(x).argmax(1).tolist())
    app = sepals.EdgeApp(model_factory=_model, train_data=TensorDataset(x, torch.zeros(5).long()))
    assert app.explain(x, 0).attributions.shape == (5, FEATURES)
    assert ig.plot(tmp_path / "bars.png").stat().st_size > 0
    with pytest.raises(ValueError, match="method must be one of"):
        sepals.explain(model, x, method="shapley-by-hand")


def test_token_inputs_are_attributed_per_token_on_the_embedding() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(4 * 6, 2))
    tokens = torch.randint(1, 20, (3, 6))
    got = sepals.explain(model, tokens, 1)
    assert got.attributions.shape == (3, 6)
    # completeness: per-token attributions add up to the score's change from the baseline
    change = model(tokens)[:, 1] - model(torch.zeros_like(tokens))[:, 1]
    np.testing.assert_allclose(got.attributions.sum(1), change.detach().numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="token inputs"):
        attribute(model, tokens, 0, method="lime")


# ------------------------------------------------------------------ DP pieces
def test_clipping_bounds_every_example_attribution_norm() -> None:
    rows = np.random.default_rng(1).normal(size=(200, 30)) * np.linspace(0.01, 5, 200)[:, None]
    clipped = clip_rows(rows, 1.5)
    norms = np.linalg.norm(clipped, axis=1)
    assert norms.max() <= 1.5 * (1 + 1e-12)
    small = np.linalg.norm(rows, axis=1) <= 1.5
    np.testing.assert_array_equal(clipped[small], rows[small])  # within the bound: unchanged
    # beyond it: same direction, norm exactly the bound
    np.testing.assert_allclose(norms[~small], 1.5)
    cosine = np.sum(clipped * rows, axis=1) / (norms * np.linalg.norm(rows, axis=1))
    np.testing.assert_allclose(cosine, 1.0)


def test_release_noise_has_the_calibrated_std() -> None:
    sigma = release_noise_multiplier(1.0, 1e-5, "pld")
    # the smallest sigma within 1e-4 whose single Gaussian release costs at most epsilon 1
    assert compute_epsilon("pld", ((sigma, 1.0, 1),), 1e-5) <= 1.0
    assert compute_epsilon("pld", ((sigma * 0.99, 1.0, 1),), 1e-5) > 1.0
    assert 3.6 < sigma < 3.9  # the analytic Gaussian mechanism's 3.73 at (1, 1e-5)
    # a model whose scores do not depend on the input: every attribution is 0, so the
    # release is the noise alone
    features = 20_000
    flat = nn.Linear(features, 1)
    nn.init.zeros_(flat.weight)
    spec = ExplanationSpec(clip=0.5, targets=1, features=features)
    values = noisy_sum(flat, torch.randn(3, features), spec, sigma, DpRandomness())
    std = sigma * spec.clip
    assert abs(values.mean()) < 4 * std / math.sqrt(features)
    # the sample std of n normal draws has sd std / sqrt(2n): 0.5% here
    assert values.std() == pytest.approx(std, rel=0.025)


def test_the_ledger_composes_the_explanation_with_training_and_refuses_past_it() -> None:
    spec = SPEC
    sigma = release_noise_multiplier(spec.epsilon, 1e-5, "pld")
    privacy = PrivacyConfig(target_epsilon=3.0)
    ledger = PrivacyLedger.empty(privacy)
    # training calibrated for 20 planned steps at q = 0.1 leaves room for the release
    planned = ledger.calibrated(privacy, 0.1, 10, 2, ((sigma, 1.0, 1),))
    trained = planned.record_round(1, ((planned.noise_multiplier, 0.1, 20),))
    trained.check_release(sigma)
    after = trained.record_release(1, sigma)
    assert after.explanations == (1,)
    assert after.history[-1] == (sigma, 1.0, 1)
    # an independent recomputation with dp-accounting's own PLD accountant
    import dp_accounting as dpa
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    event = dpa.ComposedDpEvent(
        [
            dpa.SelfComposedDpEvent(
                dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(planned.noise_multiplier)), 20
            ),
            dpa.GaussianDpEvent(sigma),
        ]
    )
    independent = accountant.compose(event).get_epsilon(1e-5)
    assert after.epsilon == pytest.approx(independent, abs=0.02)
    assert independent <= 3.0 + 0.02
    # the same release again does not fit what is left
    with pytest.raises(BudgetExhaustedError, match="explanation release"):
        after.check_release(sigma)
    # written and read back with the releases it made
    assert PrivacyLedger.from_json(after.to_json()) == after


# ------------------------------------------------------------------ encoding and opening
def _client(bundle: bytes, plan: FederationPlan, seed: int, rows: int = 30) -> SepalsClient:
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.normal(size=(rows, FEATURES)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, CLASSES, size=rows))
    runtime = ClientRuntime(
        client_id=f"client-{seed}",
        model_factory=_model,
        train_data=TensorDataset(x, y),
        test_data=None,
        privacy=PRIVACY,
        encryption=ENC,
        plan=plan,
        secret_context=bundle,
        reproducible_seed=seed,
    )
    return SepalsClient(runtime)


def _plan(bundle: bytes, fed: FederationConfig) -> tuple[FederationPlan, Any]:
    server = BfvCodec.for_server(public_bfv_bundle(bundle), ENC)
    return simulated_plan(server, fed, LENGTH)


def test_the_encrypted_sum_is_the_plaintext_sum_and_forged_sums_are_not_opened(
    bundle: bytes,
) -> None:
    plan, _ = _plan(bundle, FederationConfig(rounds=1, explanation=SPEC))
    clients = [_client(bundle, plan, seed) for seed in range(3)]
    server = BfvCodec.for_server(public_bfv_bundle(bundle), ENC)
    plain, payloads = [], []
    for i, client in enumerate(clients):
        noisy = np.random.default_rng(i).normal(scale=5.0, size=SPEC.length)
        payload, clamped = encode_release(client, noisy, SPEC, np.random.default_rng(100 + i))
        assert clamped == 0
        plain.append(noisy)
        payloads.append(payload)
    total = server.aggregate(payloads, SPEC.payload_length)
    opened = open_release(clients[0], SPEC, GlobalModel(total, 0.0, 3))
    # within each client's rounding (one grid step, in release units) of the plain sum
    step = ENC.quant_step * release_unit(clients[0].codec, SPEC)
    assert np.max(np.abs(opened - np.sum(plain, axis=0))) <= 3 * step
    # one contribution is tagged too (and DP on its own)
    open_release(clients[1], SPEC, GlobalModel(payloads[1], 0.0, 1))
    # noise past the codec's bound is clamped to it (post-processing) and still opens
    huge, clamped = encode_release(clients[2], np.full(SPEC.length, -1e12), SPEC, None)
    assert clamped == SPEC.length
    edge = open_release(clients[2], SPEC, GlobalModel(huge, 0.0, 1))
    bound = ENC.update_bound * release_unit(clients[2].codec, SPEC)
    np.testing.assert_allclose(edge, -bound, rtol=1e-9)
    # the server cannot have a training update or a global model opened as a release...
    update, _ = clients[0].codec.encode_update(np.full(SPEC.payload_length, 0.01))
    with pytest.raises(ExplanationRejectedError):
        open_release(clients[0], SPEC, GlobalModel(update, 0.0, 1))
    # ...nor a release with its values altered (a sum plus another vector's encryption)
    shifted = server.aggregate([total, update], SPEC.payload_length)
    with pytest.raises(ExplanationRejectedError):
        open_release(clients[0], SPEC, GlobalModel(shifted, 0.0, 4))


# ------------------------------------------------------------------ the round, in-process
def _round(bundle: bytes, n: int = 3) -> tuple[EncryptedFedAvg, LossyGrid, FederationPlan]:
    fed = FederationConfig(
        rounds=1, min_train_clients=2, batch_size=8, learning_rate=0.1, explanation=SPEC
    )
    fed = masked_federation(fed, n)
    server = BfvCodec.for_server(public_bfv_bundle(bundle), ENC)
    plan, signer = simulated_plan(server, fed, LENGTH)
    strategy = EncryptedFedAvg(server, LENGTH, fed, node_wait_timeout=0.0, round_signer=signer)
    nodes = [101 + 17 * i for i in range(n)]
    runtimes = {node: _client(bundle, plan, i).runtime for i, node in enumerate(nodes)}
    grid = LossyGrid(make_client_app(lambda ctx: runtimes[ctx.node_id]), nodes)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=1, timeout=5.0)  # type: ignore[arg-type]
    return strategy, grid, plan


def _ledger(grid: LossyGrid, node: int) -> PrivacyLedger:
    return PrivacyLedger.from_json(str(grid.contexts[node].state[LEDGER_STATE_KEY]["json"]))  # type: ignore[index]


@pytest.mark.usefixtures("run_identity")
def test_the_explanation_round_releases_a_dp_sum_and_refuses_past_the_budget(
    bundle: bytes,
) -> None:
    strategy, grid, _ = _round(bundle)
    assert strategy.history[0].aggregated and strategy.history[0].masks_removed
    spent = grid.nodes[0]
    # one client has spent its whole budget already: it declines, the round goes on
    full = dataclasses.replace(_ledger(grid, spent), history=((0.5, 1.0, 40),), epsilon=50.0)
    grid.contexts[spent].state[LEDGER_STATE_KEY] = ConfigRecord({"json": full.to_json()})
    record = strategy.explain(grid)  # type: ignore[arg-type]
    assert record is not None and record.release is not None
    assert record.release.shape == (SPEC.length,) and np.isfinite(record.release).all()
    assert [node for node, _ in record.declined] == [spent]
    assert "budget" in record.declined[0][1]
    assert len(record.clients) == 2 and record.examples == 60
    assert (record.openers_asked, record.openers_agreeing) == (2, 2)
    for node in grid.nodes[1:]:
        ledger = _ledger(grid, node)
        assert ledger.explanations == (1,) and ledger.history[-1][1:] == (1.0, 1)
        assert ledger.epsilon is not None and ledger.epsilon <= PRIVACY.target_epsilon
        assert ledger.epsilon == compute_epsilon("rdp", ledger.history, 1e-5)
    assert grid.stages.count("train.explain") == 3
    # the same release is never made twice
    again = strategy.explain(grid)  # type: ignore[arg-type]
    assert again is not None and again.release is None and not again.clients
    assert {reason for _, reason in again.excluded} == {"explanation already released"}
    # a server that asks for the global model to be "opened" gets an error, no values
    assert strategy.latest_global is not None
    candidate = read_global_model(strategy.latest_global)
    assert candidate is not None
    forged = global_record(candidate.payload, 1.0, summands=3)
    (msg,) = strategy._explain_messages(SPEC, forged, [grid.nodes[1]], EXPLAIN_OPEN)
    reply = grid.app(message=msg, context=grid.contexts[grid.nodes[1]])
    assert reply.has_error() and reply.error.code == ERR_BAD_GLOBAL
    assert reply.error.reason == "explanation sum rejected: tag or length"


@pytest.mark.usefixtures("run_identity")
def test_a_plan_without_an_explanation_is_refused(bundle: bytes) -> None:
    fed = FederationConfig(rounds=1, min_train_clients=1)
    plan, signer = _plan(bundle, fed)
    client = _client(bundle, plan, 0)
    app = make_client_app(lambda ctx: client.runtime)
    strategy = EncryptedFedAvg(
        BfvCodec.for_server(public_bfv_bundle(bundle), ENC),
        LENGTH,
        dataclasses.replace(fed, explanation=SPEC),
        round_signer=signer,
    )
    (msg,) = strategy._explain_messages(SPEC, ArrayRecord(), [1], "train.explain")
    grid = LossyGrid(app, [1])
    reply = app(message=msg, context=grid.contexts[1])
    assert reply.has_error() and "plan mismatch: explanation" in reply.error.reason
    with pytest.raises(ValueError, match="ckks"):
        FederationPlan.from_dict({**plan.to_dict(), "codec": "ckks", "explanation": SPEC.to_dict()})


def test_a_deployment_asks_for_the_round_in_its_config(tmp_path: Any) -> None:
    from sepals.server.control.config import ServerDeployConfig
    from sepals.server.control.provision import ProvisionSpec, provision

    spec = ExplanationSpec(epsilon=0.5, method="integrated_gradients")
    result = provision(
        ProvisionSpec(
            out=tmp_path / "fl", clients=2, server_host="localhost", rounds=2, explanation=spec
        )
    )
    # the default model's shape fills the plan's: 10 classes of 64 pixels
    assert result.plan.explanation == dataclasses.replace(spec, targets=10, features=64)
    toml = tmp_path / "fl" / "server" / "server.toml"
    config = ServerDeployConfig.from_toml(toml)
    assert config.federation.explanation == result.plan.explanation
    config.run_spec().signer(config.codec())  # server.toml agrees with the plan
    # a server.toml without the plan's explanation round is refused before any round
    text = toml.read_text()
    toml.write_text(text.replace("[federation.explanation]", "[unused]").split("[unused]")[0]
                    + "[nodes]" + text.split("[nodes]")[1])  # fmt: skip
    edited = ServerDeployConfig.from_toml(toml)
    with pytest.raises(ValueError, match="explanation"):
        edited.run_spec().signer(edited.codec())


def test_the_simulation_front_ends_ask_for_the_round() -> None:
    from sepals.common.explain_spec import explanation_option
    from sepals.simulations.cli import build_parser, config_from_args

    args = build_parser().parse_args(["--explain", "lime", "--explain-epsilon", "0.5"])
    spec = config_from_args(args).federation.explanation
    assert spec == ExplanationSpec(epsilon=0.5, method="lime")
    assert config_from_args(build_parser().parse_args([])).federation.explanation is None
    assert explanation_option(True) == ExplanationSpec()
    assert explanation_option("integrated_gradients").method == "integrated_gradients"
    assert explanation_option({"epsilon": 2}).epsilon == 2.0
    assert explanation_option(None) is None
    with pytest.raises(ValueError, match="unknown key"):
        explanation_option({"epsilon": 1, "budget": 3})
    with pytest.raises(ValueError, match="positive"):
        ExplanationSpec(epsilon=0)
