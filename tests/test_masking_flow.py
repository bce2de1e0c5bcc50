"""Pairwise masking through the real Message-API path: strategy, messages, ClientApps.

The server is :class:`EncryptedFedAvg` with BFV and masking; each node is the sepals
ClientApp (the one simulations and edge nodes run) with a tiny model, reached through an
in-process grid that can lose or delay replies as a network would. Every run uses
seeded DP noise and rounding, so a masked and an unmasked run must reach bit-identical
aggregates.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from grid_util import LossyGrid
from torch import nn
from torch.utils.data import TensorDataset

from sepals.client.app import load_mask_state, make_client_app
from sepals.client.core import ClientRuntime
from sepals.client.privacy import PrivacyLedger
from sepals.common.bfv import BfvCodec
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.federation import FederationConfig
from sepals.common.masking import masked_federation
from sepals.common.protocol import ERR_MASKING, MASK_UNMASK
from sepals.common.records import read_global_record
from sepals.common.seal_bundle import generate_bfv_bundle, public_bfv_bundle
from sepals.server.serverapp.strategy import EncryptedFedAvg, exchange
from sepals.simulations.harness import simulated_plan

pytestmark = pytest.mark.usefixtures("run_identity")

ENC = EncryptionConfig(max_clients=8)
PRIVACY = PrivacyConfig(target_epsilon=8.0)
FEATURES, CLASSES = 4, 3
LENGTH = FEATURES * CLASSES + CLASSES


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, CLASSES)


@pytest.fixture(scope="module")
def bundle() -> bytes:
    return generate_bfv_bundle(ENC)


def _federation(n: int, rounds: int, masked: bool, threshold: int | None = None) -> Any:
    fed = FederationConfig(rounds=rounds, min_train_clients=2, batch_size=8, learning_rate=0.1)
    return masked_federation(fed, n, threshold=threshold) if masked else fed


def _run(
    bundle: bytes,
    n: int,
    *,
    masked: bool = True,
    rounds: int = 1,
    threshold: int | None = None,
    lose: dict[str, set[int]] | None = None,
    late: dict[str, set[int]] | None = None,
    plan_fed: FederationConfig | None = None,
    fed: FederationConfig | None = None,
    before: Any = None,
) -> tuple[EncryptedFedAvg, LossyGrid]:
    fed = fed or _federation(n, rounds, masked, threshold)
    server = BfvCodec.for_server(public_bfv_bundle(bundle), ENC)
    plan, signer = simulated_plan(server, plan_fed or fed, LENGTH)
    strategy = EncryptedFedAvg(server, LENGTH, fed, node_wait_timeout=0.0, round_signer=signer)
    nodes = [101 + 17 * i for i in range(n)]
    rng = np.random.default_rng(7)
    runtimes = {}
    for i, node in enumerate(nodes):
        x = torch.tensor(rng.normal(size=(40, FEATURES)), dtype=torch.float32)
        y = torch.tensor(rng.integers(0, CLASSES, size=40))
        runtimes[node] = ClientRuntime(
            client_id=f"client-{i}",
            model_factory=_model,
            train_data=TensorDataset(x, y),
            test_data=None,
            privacy=PRIVACY,
            encryption=ENC,
            plan=plan,
            secret_context=bundle,
            reproducible_seed=i,
        )
    app = make_client_app(lambda ctx: runtimes[ctx.node_id])
    grid = LossyGrid(app, nodes)
    grid.lose, grid.late, grid.before = lose or {}, late or {}, before
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=rounds, timeout=5.0)  # type: ignore[arg-type]
    return strategy, grid


def _sum(bundle: bytes, strategy: EncryptedFedAvg) -> np.ndarray:
    assert strategy.latest_global is not None
    parsed = read_global_record(strategy.latest_global)
    assert parsed is not None
    return BfvCodec.for_client(bundle, ENC).integer_sum(parsed[0])


def _ledger(grid: LossyGrid, node: int) -> PrivacyLedger:
    record = grid.contexts[node].state["sepals-ledger"]
    return PrivacyLedger.from_json(str(record["json"]))  # type: ignore[index]


def test_masked_sum_equals_unmasked_sum_exactly(bundle: bytes) -> None:
    masked, grid = _run(bundle, 4, rounds=2)
    plain, _ = _run(bundle, 4, masked=False, rounds=2)
    np.testing.assert_array_equal(_sum(bundle, masked), _sum(bundle, plain))
    for record in masked.history:
        assert record.aggregated and record.masks_removed
        assert (record.mask_members, record.mask_survivors, record.mask_dropouts) == (4, 4, 0)
    # Keys are registered once per node and run; round 1's unmask request rode with
    # round 2's setup, and only the last round's went alone.
    assert grid.stages.count("train.mask_register") == 4
    assert grid.stages.count("train.mask_setup") == 8
    assert grid.stages.count("train.mask_unmask") == 4
    assert not any(r.masking for r in plain.history)
    # The round's secrets are gone once the unmask is answered.
    state = load_mask_state(grid.contexts[grid.nodes[0]])
    assert state is not None and state.stage == "unmasked" and not state.self_seed


@pytest.mark.parametrize("dropped", [1, 2])
def test_dropouts_up_to_the_limit_are_unmasked_exactly(bundle: bytes, dropped: int) -> None:
    # 6 clients, complete graph: k = 5, T = 4, so 2 dropouts leave every secret 4 holders.
    nodes = [101 + 17 * i for i in range(6)]
    lost = {"train": set(nodes[:dropped])}
    masked, _ = _run(bundle, 6, lose=lost)
    plain, _ = _run(bundle, 6, masked=False, lose=lost)
    (record,) = masked.history
    assert masked.masking is not None and masked.masking.threshold == 4
    assert record.aggregated and record.masks_removed
    assert (record.mask_survivors, record.mask_dropouts) == (6 - dropped, dropped)
    np.testing.assert_array_equal(_sum(bundle, masked), _sum(bundle, plain))


def test_beyond_the_limit_the_round_is_abandoned(bundle: bytes) -> None:
    nodes = [101 + 17 * i for i in range(6)]
    masked, grid = _run(bundle, 6, rounds=2, lose={"train": set(nodes[:3])})
    first, second = masked.history
    assert first.aggregated is False and first.masks_removed is False
    assert first.mask_abandoned == "3 survivors, fewer than the threshold 4"
    assert MASK_UNMASK not in grid.stages  # nobody is asked to reveal anything
    assert masked.latest_global is None  # the global model never changed
    # Each client spent budget only on the rounds it trained in; the abandoned rounds
    # cost nothing beyond that training.
    for node in nodes:
        ledger = _ledger(grid, node)
        assert ledger.rounds == (1, 2)
    assert second.aggregated is False


def test_too_few_at_setup_abandons_before_anyone_trains(bundle: bytes) -> None:
    nodes = [101 + 17 * i for i in range(6)]
    masked, grid = _run(bundle, 6, lose={"train.mask_setup": set(nodes[:4])})
    (record,) = masked.history
    assert record.mask_abandoned and "masking setup" in record.mask_abandoned
    assert "train" not in grid.stages
    for node in nodes:
        assert "sepals-ledger" not in grid.contexts[node].state


def test_a_late_train_reply_after_the_unmask_stage_is_excluded(bundle: bytes) -> None:
    nodes = [101 + 17 * i for i in range(6)]
    masked, _ = _run(bundle, 6, late={"train": {nodes[0]}})
    plain, _ = _run(bundle, 6, masked=False, lose={"train": {nodes[0]}})
    (record,) = masked.history
    assert record.aggregated and record.masks_removed
    assert (record.mask_survivors, record.mask_dropouts) == (5, 1)
    assert nodes[0] not in {c.node_id for c in record.clients}
    np.testing.assert_array_equal(_sum(bundle, masked), _sum(bundle, plain))


def test_sparse_graph_with_a_dropout(bundle: bytes) -> None:
    nodes = [101 + 17 * i for i in range(8)]
    base = FederationConfig(rounds=1, min_train_clients=2, batch_size=8, learning_rate=0.1)
    fed = masked_federation(base, 8, neighbours=4, threshold=3)
    masked, _ = _run(bundle, 8, fed=fed, lose={"train": {nodes[1]}})
    plain, _ = _run(bundle, 8, fed=base, lose={"train": {nodes[1]}})
    (record,) = masked.history
    assert record.aggregated and record.masks_removed
    assert (record.mask_survivors, record.mask_dropouts) == (7, 1)
    np.testing.assert_array_equal(_sum(bundle, masked), _sum(bundle, plain))


def test_a_masked_plan_refuses_an_unmasked_round(bundle: bytes) -> None:
    plan_fed = _federation(4, 1, True)
    unmasked, grid = _run(bundle, 4, masked=False, plan_fed=plan_fed)
    (record,) = unmasked.history
    assert record.aggregated is False
    codes = {reason for _, reason in record.excluded}
    assert codes and all("plan mismatch" in r for r in codes), codes
    for node in grid.nodes:
        assert "sepals-ledger" not in grid.contexts[node].state  # no budget spent


def test_a_second_unmask_request_is_refused(bundle: bytes) -> None:
    masked, grid = _run(bundle, 4)
    node = grid.nodes[0]
    # Replay the round's unmask stage at the node with another split of the members.
    state = load_mask_state(grid.contexts[node])
    assert state is not None and state.stage == "unmasked"
    strategy = masked
    # The signed message a server that wants a second reveal would send.
    msgs = strategy._messages(
        1, ArrayRecord(), [node], MASK_UNMASK, lambda _n: {"survivors": b"", "dropped": b""}
    )
    reply = grid.app(message=msgs[0], context=grid.contexts[node])
    assert reply.has_error() and reply.error.code == ERR_MASKING


def test_masking_needs_bfv() -> None:
    from sepals.common.codec import PlainCodec

    fed = dataclasses.replace(FederationConfig(), mask_neighbours=2, mask_threshold=2)
    with pytest.raises(ValueError, match="masking needs the BFV codec"):
        EncryptedFedAvg(PlainCodec(), LENGTH, fed)


class _PushPullGrid:
    """Replies become available ``delay`` seconds after the push; one never comes."""

    def __init__(self, delay: float, silent: int) -> None:
        self.delay, self.silent = delay, silent
        self.pulls = 0
        self._due: dict[str, tuple[float, Any]] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for i, _msg in enumerate(messages):
            mid = f"m{i}"
            ids.append(mid)
            if i != self.silent:
                reply = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid))
                self._due[mid] = (time.monotonic() + self.delay, reply)
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Any]:
        self.pulls += 1
        now = time.monotonic()
        ready = [m for m in ids if m in self._due and self._due[m][0] <= now]
        return [self._due.pop(m)[1] for m in ready]


def test_exchange_collects_replies_until_all_are_in_or_the_timeout() -> None:
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3)]
    grid = _PushPullGrid(delay=0.05, silent=-1)
    t0 = time.monotonic()
    assert len(exchange(grid, msgs, timeout=5.0)) == 3  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 1.0  # returned as soon as all were in, not at the timeout
    grid = _PushPullGrid(delay=0.0, silent=1)
    t0 = time.monotonic()
    assert len(exchange(grid, msgs, timeout=0.3)) == 2  # type: ignore[arg-type]
    assert 0.3 <= time.monotonic() - t0 < 2.0


def test_partial_sampling_unmasks_survivors_not_sampled_again(bundle: bytes) -> None:
    base = FederationConfig(
        rounds=3, fraction_train=0.5, min_train_clients=2, batch_size=8, learning_rate=0.1
    )
    fed = masked_federation(base, 4)
    masked, grid = _run(bundle, 8, rounds=3, fed=fed)
    plain, _ = _run(bundle, 8, rounds=3, fed=base)
    assert [r.masks_removed for r in masked.history] == [True, True, True]
    assert [{c.node_id for c in r.clients} for r in masked.history] == [
        {c.node_id for c in r.clients} for r in plain.history
    ]
    np.testing.assert_array_equal(_sum(bundle, masked), _sum(bundle, plain))
    # Survivors of a round not sampled for the next got their unmask request alone.
    assert grid.stages.count("train.mask_unmask") > 4


def test_a_node_with_a_new_share_key_sits_one_round_out(bundle: bytes) -> None:
    node = 101  # the first node

    def forget(msg: Message, context: Context) -> None:
        config = msg.content.config_records["config"]
        if (
            msg.metadata.message_type == "train.mask_setup"
            and config["server-round"] == 2
            and msg.metadata.dst_node_id == node
        ):
            del context.state["sepals-mask-share"]  # a restarted node's state is lost

    masked, _ = _run(bundle, 5, rounds=3, before=forget)
    first, second, third = masked.history
    assert first.mask_members == 5 and second.mask_members == 4 and third.mask_members == 5
    assert all(r.masks_removed for r in masked.history)
    assert node not in {c.node_id for c in second.clients}
