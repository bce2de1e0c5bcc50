"""Clients with many examples train under BFV with masks at any dataset size.

A client encodes its change from the shared round-0 model weighted by
``min(n, weight_cap) / weight_cap``, so what it encodes no longer grows with its example
count: 40,000 examples and weights of order 1 (a slope of 3) fit the field, and the model
matches a plaintext run of the same clients within the quantization error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from grid_util import LossyGrid
from torch import nn
from torch.utils.data import TensorDataset

from sepals.client.app import make_client_app
from sepals.client.core import ClientRuntime, SepalsClient
from sepals.client.privacy import PrivacyLedger
from sepals.common.bfv import BfvCodec
from sepals.common.codec import PlainCodec
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.federation import FederationConfig
from sepals.common.masking import masked_federation
from sepals.common.protocol import RoundConfig, decode_global_model, encode_contribution
from sepals.common.records import read_global_record
from sepals.common.seal_bundle import generate_bfv_bundle, public_bfv_bundle
from sepals.server.serverapp.roster import NodeRoster
from sepals.server.serverapp.strategy import EncryptedFedAvg
from sepals.simulations.harness import simulated_plan

pytestmark = pytest.mark.usefixtures("run_identity")

ENC = EncryptionConfig(max_clients=4)
EXAMPLES = 40_000
CLIENTS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(1, 1)


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out.squeeze(-1), y)


def _data(i: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(100 + i)
    x = torch.randn(EXAMPLES, 1, generator=gen)
    return TensorDataset(x, 3.0 * x.squeeze(-1) + 0.1 * torch.randn(EXAMPLES, generator=gen))


def _run(bundle: bytes | None, rounds: int) -> tuple[EncryptedFedAvg, np.ndarray]:
    fed = FederationConfig(
        rounds=rounds,
        min_train_clients=2,
        batch_size=4_000,
        learning_rate=0.5,
        momentum=0.0,
        lr_schedule="constant",
        weight_cap=EXAMPLES,
    )
    if bundle is not None:
        fed = masked_federation(fed, CLIENTS)
        server: BfvCodec | PlainCodec = BfvCodec.for_server(public_bfv_bundle(bundle), ENC)
    else:
        server = PlainCodec()
    plan, signer = simulated_plan(server, fed, 2)
    strategy = EncryptedFedAvg(
        server,
        2,
        fed,
        node_wait_timeout=0.0,
        round_signer=signer,
        roster=NodeRoster(default_cap=EXAMPLES),
    )
    nodes = [201 + i for i in range(CLIENTS)]
    runtimes = {
        node: ClientRuntime(
            client_id=f"client-{i}",
            model_factory=_model,
            train_data=_data(i),
            test_data=None,
            privacy=PrivacyConfig(target_epsilon=8.0, delta=1e-6),
            encryption=ENC if bundle is not None else EncryptionConfig(scheme="none"),
            plan=plan,
            secret_context=bundle,
            loss_fn=_mse,
            reproducible_seed=i,  # the same DP randomness in both runs
        )
        for i, node in enumerate(nodes)
    }
    app = make_client_app(lambda ctx: runtimes[ctx.node_id])
    grid = LossyGrid(app, nodes)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=rounds, timeout=5.0)  # type: ignore[arg-type]
    parsed = read_global_record(strategy.latest_global)
    assert parsed is not None
    client = SepalsClient(runtimes[nodes[0]])
    model = decode_global_model(client.codec, client.factory, parsed, plan.model_seed)
    return strategy, model


def test_forty_thousand_examples_a_client_train_under_bfv_with_masks() -> None:
    bundle = generate_bfv_bundle(ENC)
    masked, model = _run(bundle, rounds=1)
    plain, reference = _run(None, rounds=1)
    record = masked.history[-1]
    assert record.aggregated and record.masks_removed and record.accepted == CLIENTS
    assert all(c.num_examples == EXAMPLES and c.clamped_values == 0 for c in record.clients)
    assert record.weight_total == pytest.approx(CLIENTS)
    # Every client's rounding error is below one grid step; the average is within the
    # round's reported bound of the plaintext run (the same seeds, the same training).
    assert record.quant_error is not None and record.quant_error <= ENC.quant_step
    assert np.max(np.abs(model - reference)) <= record.quant_error + 1e-6
    assert plain.history[-1].aggregated
    slope = model[0]
    assert 1.0 < slope < 3.5  # one round of ten steps moved it toward 3 from its start


def test_the_weight_saturates_at_the_cap_and_changes_are_clamped_not_refused() -> None:
    anchor = np.zeros(4)
    weights = np.array([0.5, -2.0, 40.0, -40.0])
    change, clamped = encode_contribution(weights, anchor, 100_000, 40_000, 16.0)
    assert clamped == 2
    np.testing.assert_array_equal(change, [0.5, -2.0, 16.0, -16.0])  # weight min(n, cap)/cap = 1
    half, clamped = encode_contribution(weights, anchor, 20_000, 40_000, 16.0)
    assert clamped == 2
    np.testing.assert_array_equal(half, [0.25, -1.0, 16.0, -16.0])  # weight 1/2, then clamped
    free, clamped = encode_contribution(weights, anchor, 20_000, 40_000, None)
    assert clamped == 0
    np.testing.assert_array_equal(free, weights / 2)


def test_a_client_clamps_to_the_bound_and_reports_how_many_values() -> None:
    tight = EncryptionConfig(max_clients=4, update_bound=0.1)
    bundle = generate_bfv_bundle(tight)
    plan_fed = FederationConfig(rounds=1, weight_cap=EXAMPLES, batch_size=4_000, momentum=0.0)
    plan, _ = simulated_plan(BfvCodec.for_server(public_bfv_bundle(bundle), tight), plan_fed, 2)
    runtime = ClientRuntime(
        client_id="c",
        model_factory=_model,
        train_data=_data(0),
        test_data=None,
        privacy=PrivacyConfig(target_epsilon=None),
        encryption=tight,
        plan=plan,
        secret_context=bundle,
        loss_fn=_mse,
    )
    client = SepalsClient(runtime)
    reply = client.train(RoundConfig.for_plan(plan, 1), None, PrivacyLedger.empty(runtime.privacy))
    # The slope moves by more than 0.1 from its start: clamped, encoded, reported.
    assert reply.metrics["clamped-values"] >= 1
    change = client.codec.decode(reply.payload)
    assert np.max(np.abs(change)) <= 0.1 + tight.quant_step
