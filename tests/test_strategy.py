from __future__ import annotations

import base64
import hashlib
import json
import logging
import math

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from sepals.common.bfv import BfvCodec
from sepals.common.ckks import CkksCodec
from sepals.common.codec import PlainCodec, unpack_payload
from sepals.common.config import EncryptionConfig
from sepals.common.errors import MalformedPayloadError
from sepals.common.federation import DEFAULT_WEIGHT_CAP, FederationConfig, update_weight
from sepals.common.protocol import ERR_BUDGET_EXHAUSTED, KEY_CLIENT, KEY_METRICS, KEY_UPDATE
from sepals.common.records import KEY_PAYLOAD, payload_array, read_global_record
from sepals.common.scheme import generate_secret_context
from sepals.server.serverapp.roster import (
    DEFAULT_EXAMPLE_CAP,
    UNCONFIGURED,
    NodeRoster,
    RosterError,
)
from sepals.server.serverapp.state import CheckpointError, StateDir
from sepals.server.serverapp.strategy import EncryptedFedAvg, ReplayKeys

CFG = EncryptionConfig(scheme="ckks")
LENGTH = 50


def _a(n: int) -> float:
    """The FedAvg weight of a reply of ``n`` examples under the default weight cap."""
    return update_weight(n, DEFAULT_WEIGHT_CAP)


pytestmark = pytest.mark.usefixtures("run_identity")


def _reply(node: int, payload: bytes, n: int, eps: float = 1.0) -> Message:
    orig = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            KEY_UPDATE: ArrayRecord({KEY_PAYLOAD: payload_array(payload)}),
            KEY_METRICS: MetricRecord({"num-examples": n, "epsilon": eps, "total-steps": 5}),
            KEY_CLIENT: ConfigRecord({"client-id": f"c{node}", "accountant": "rdp"}),
        }
    )
    return Message(content, reply_to=orig)


def _error(node: int, code: int, reason: str) -> Message:
    orig = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=code, reason=reason), reply_to=orig)


def test_bad_replies_are_excluded_and_round_completes(ckks_keys, caplog):
    secret, public = ckks_keys
    client = CkksCodec.for_client(secret, CFG)
    server = CkksCodec.for_server(public, CFG)
    foreign = CkksCodec.for_client(generate_secret_context(CFG), CFG)
    # CKKS's error is absolute: weights near 1 (a cap near the counts) keep it small.
    strategy = EncryptedFedAvg(server, LENGTH, FederationConfig(rounds=1, weight_cap=100))
    rng = np.random.default_rng(0)
    good = {1: (rng.normal(size=LENGTH), 30), 2: (rng.normal(size=LENGTH), 70)}
    replies = [_reply(node, client.encode(w * n / 100), n) for node, (w, n) in good.items()]
    truncated = client.encode(np.ones(LENGTH))
    replies += [
        _reply(3, foreign.encode(np.ones(LENGTH)), 10),
        _reply(4, truncated[: len(truncated) - 100], 10),
        _reply(5, client.encode(np.ones(LENGTH + 1)), 10),
        _reply(6, client.encode(np.ones(LENGTH)), 0),
        _error(7, ERR_BUDGET_EXHAUSTED, "privacy budget exhausted"),
        _error(8, 1, "crashed"),
    ]
    with caplog.at_level(logging.WARNING, logger="sepals"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert metrics["accepted"] == 2 and metrics["excluded"] == 5 and metrics["declined"] == 1
    payload, weight_total = read_global_record(arrays)
    assert weight_total == pytest.approx(1.0)
    expected = (good[1][0] * 30 + good[2][0] * 70) / 100
    np.testing.assert_allclose(client.decode(payload) / weight_total, expected, atol=1e-6)
    record = strategy.current_round
    reasons = dict(record.excluded)
    assert "ForeignKeyError" in reasons[3]
    assert "MalformedPayloadError" in reasons[4]
    assert "51 values, expected 50" in reasons[5]
    assert "num-examples" in reasons[6]
    assert "crashed" in reasons[8]
    assert record.declined == [(7, "privacy budget exhausted")]
    assert "excluding node 3" in caplog.text
    # the aggregate is still a ciphertext: the server cannot open it
    assert unpack_payload(payload)[0].codec_id == server.codec_id
    assert not server.can_decrypt


def test_no_valid_reply_keeps_global_model():
    strategy = EncryptedFedAvg(PlainCodec(), LENGTH, FederationConfig(rounds=1))
    arrays, metrics = strategy.aggregate_train(1, [_error(1, ERR_BUDGET_EXHAUSTED, "spent")])
    assert arrays is None
    assert metrics is not None and metrics["declined"] == 1


def test_plain_path_is_fedavg():
    codec = PlainCodec()
    strategy = EncryptedFedAvg(codec, LENGTH, FederationConfig(rounds=1))
    rng = np.random.default_rng(3)
    models = [(rng.normal(size=LENGTH), n) for n in (10, 20, 30)]
    replies = [_reply(i + 1, codec.encode(w * _a(n)), n) for i, (w, n) in enumerate(models)]
    arrays, _ = strategy.aggregate_train(1, replies)
    payload, total = read_global_record(arrays)
    expected = sum(w * n for w, n in models) / 60
    np.testing.assert_allclose(codec.decode(payload) / total, expected, atol=1e-5)


def test_strategy_rejects_bad_length():
    with pytest.raises(ValueError, match="vector_length"):
        EncryptedFedAvg(PlainCodec(), 0, FederationConfig())


def test_quantization_error_bound_of_the_round():
    """The round's error bound is sum(client rounding errors) / sum(weights)."""
    codec = PlainCodec()
    strategy = EncryptedFedAvg(codec, LENGTH, FederationConfig(rounds=1))
    replies = []
    for node, (n, err) in enumerate([(10, 0.2), (30, 0.4)], start=1):
        reply = _reply(node, codec.encode(np.ones(LENGTH) * _a(n)), n)
        reply.content[KEY_METRICS]["quant-error"] = err
        replies.append(reply)
    _, metrics = strategy.aggregate_train(1, replies)
    record = strategy.current_round
    assert record.codec == "plain-fp32"
    assert record.quant_error == pytest.approx(0.6 / _a(40))
    assert metrics["quant-error"] == pytest.approx(0.6 / _a(40))
    assert [c.quant_error for c in record.clients] == [0.2, 0.4]
    # a client that does not report its error leaves the bound unknown
    strategy = EncryptedFedAvg(codec, LENGTH, FederationConfig(rounds=1))
    strategy.aggregate_train(1, [*replies, _reply(9, codec.encode(np.ones(LENGTH)), 5)])
    assert strategy.current_round.quant_error is None


# ------------------------------------------------ replies that cannot skew a round
# Each attack below is one that could crash or skew a round; the attacker's reply is
# excluded with a reason and the round completes with the honest replies.

BFV = EncryptionConfig()


def _bfv(bfv_keys, config: EncryptionConfig = BFV) -> tuple[BfvCodec, BfvCodec]:
    secret, public = bfv_keys
    return BfvCodec.for_client(secret, config), BfvCodec.for_server(public, config)


def _honest(client, rng, nodes=(1, 2), sizes=(30, 70)):
    """Honest replies and the FedAvg they should produce (from what each encoded)."""
    replies, payloads = [], []
    for node, n in zip(nodes, sizes, strict=True):
        payload = client.encode(rng.uniform(-1, 1, size=LENGTH) * _a(n))
        payloads.append(payload)
        replies.append(_reply(node, payload, n))
    expected = sum(client.decode(p) for p in payloads) / sum(_a(n) for n in sizes)
    return replies, payloads, expected


def _fedavg(client, arrays):
    payload, weight_total = read_global_record(arrays)
    return client.decode(payload) / weight_total, weight_total


def _set_metric(msg: Message, key: str, value) -> Message:
    # MetricRecord refuses strings and bools at construction; a hostile peer's record
    # is not built through it, so write past the check.
    msg.content.metric_records[KEY_METRICS]._data[key] = value
    return msg


def _drop_metric(msg: Message, key: str) -> Message:
    del msg.content.metric_records[KEY_METRICS]._data[key]
    return msg


BAD_TRAIN_METRICS = [
    ("total-steps", math.inf),
    ("rounds-participated", math.inf),
    ("total-steps", 1e300),
    ("total-steps", 5.0),
    ("total-steps", -1),
    ("total-steps", 10**30),
    ("rounds-participated", True),
    ("rounds-participated", "3"),
    ("steps", math.nan),
    ("epsilon", math.nan),
    ("epsilon", -0.5),
    ("epsilon", math.inf),
    ("epsilon", "8"),
    ("epsilon", [1.0]),
    ("delta", 0.0),
    ("delta", 1.0),
    ("noise-multiplier", -1.0),
    ("noise-multiplier", math.inf),
    ("sample-rate", 0.0),
    ("sample-rate", 1.5),
    ("quant-error", -1e-3),
    ("quant-error", 1.0),  # above one BFV quantization step
    ("train-seconds", math.inf),
    ("encrypt-seconds", -2.0),
]


def test_non_finite_or_out_of_range_train_metrics_are_excluded(bfv_keys, caplog):
    client, server = _bfv(bfv_keys)
    strategy = EncryptedFedAvg(server, LENGTH, FederationConfig(rounds=1))
    replies, _, expected = _honest(client, np.random.default_rng(1))
    for i, (key, value) in enumerate(BAD_TRAIN_METRICS, start=10):
        replies.append(_set_metric(_reply(i, client.encode(np.ones(LENGTH)), 10), key, value))
    with caplog.at_level(logging.WARNING, logger="sepals"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["accepted"] == 2 and metrics["excluded"] == len(BAD_TRAIN_METRICS)
    model, total = _fedavg(client, arrays)
    assert total == pytest.approx(_a(100))
    np.testing.assert_allclose(model, expected, atol=1e-9)
    reasons = dict(strategy.current_round.excluded)
    for i, (key, _) in enumerate(BAD_TRAIN_METRICS, start=10):
        assert reasons[i].startswith(key), (key, reasons[i])
    assert "inf" not in " ".join(reasons.values()).replace("[0, inf)", "")


def test_accountant_must_be_a_known_name(bfv_keys):
    client, server = _bfv(bfv_keys)
    strategy = EncryptedFedAvg(server, LENGTH, FederationConfig(rounds=1, min_train_clients=1))
    bad = _reply(1, client.encode(np.ones(LENGTH)), 5)
    bad.content.config_records[KEY_CLIENT]["accountant"] = "rdp\x1b[2J"
    arrays, metrics = strategy.aggregate_train(1, [bad])
    assert arrays is None and metrics["excluded"] == 1
    assert strategy.current_round.excluded == [(1, "accountant must be one of pld, rdp")]


@pytest.mark.parametrize("n", [0.5, 1e15, 10**15, 361, 0, -3, True, 360.0, [30]])
def test_num_examples_must_be_an_integer_within_the_node_cap(bfv_keys, n):
    client, server = _bfv(bfv_keys)
    roster = NodeRoster(default_cap=360)
    fed = FederationConfig(rounds=1, min_train_clients=1)
    strategy = EncryptedFedAvg(server, LENGTH, fed, roster=roster)
    honest, _, expected = _honest(client, np.random.default_rng(2), nodes=(1,), sizes=(360,))
    attacker = _set_metric(_reply(2, client.encode(np.full(LENGTH, 1e-3)), 1), "num-examples", n)
    arrays, metrics = strategy.aggregate_train(1, [attacker, *honest])
    assert metrics["accepted"] == 1 and metrics["excluded"] == 1
    assert strategy.current_round.excluded == [(2, "num-examples must be an integer in [1, 360]")]
    model, total = _fedavg(client, arrays)
    assert total == pytest.approx(_a(360))
    np.testing.assert_allclose(model, expected, atol=1e-9)


def test_a_lone_fractional_count_no_longer_divides_by_zero(bfv_keys):
    client, server = _bfv(bfv_keys)
    strategy = EncryptedFedAvg(server, LENGTH, FederationConfig(rounds=1, min_train_clients=1))
    lone = _set_metric(_reply(1, client.encode(np.ones(LENGTH)), 1), "num-examples", 0.5)
    arrays, metrics = strategy.aggregate_train(1, [lone])
    assert arrays is None and metrics["excluded"] == 1 and metrics["accepted"] == 0
    missing = _drop_metric(_reply(2, client.encode(np.ones(LENGTH)), 1), "num-examples")
    strategy.aggregate_train(2, [missing])
    assert "num-examples" in strategy.current_round.excluded[0][1]


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        return []  # nodes that never answer (here: the verification of a candidate)


def test_sampling_and_aggregation_never_exceed_max_clients(bfv_keys):
    config = EncryptionConfig(max_clients=3)
    client, server = _bfv(bfv_keys, config)
    fed = FederationConfig(rounds=1, fraction_train=1.0, min_train_clients=1)
    strategy = EncryptedFedAvg(server, LENGTH, fed, node_wait_timeout=0.01)
    assert strategy.max_clients == 3
    sent = list(
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid(list(range(1, 11))))
    )
    assert len(sent) == 3
    # Five valid replies (say, a grid that answers more nodes than were asked): three are
    # added, the other two are excluded instead of crashing the codec.
    strategy = EncryptedFedAvg(server, LENGTH, fed)
    replies, _, expected = _honest(client, np.random.default_rng(4), (1, 2, 3), (10, 20, 30))
    replies += [_reply(node, client.encode(np.ones(LENGTH) * _a(5)), 5) for node in (4, 5)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["accepted"] == 3 and metrics["excluded"] == 2
    assert [node for node, _ in strategy.current_round.excluded] == [4, 5]
    assert all("max_clients=3" in r for _, r in strategy.current_round.excluded)
    model, total = _fedavg(client, arrays)
    assert total == pytest.approx(_a(60))
    np.testing.assert_allclose(model, expected, atol=1e-9)


def test_max_clients_settings():
    fed = FederationConfig(rounds=1, min_train_clients=1)
    assert EncryptedFedAvg(PlainCodec(), LENGTH, fed).max_clients is None
    assert EncryptedFedAvg(PlainCodec(), LENGTH, fed, max_clients=4).max_clients == 4
    with pytest.raises(ValueError, match="max_clients"):
        EncryptedFedAvg(PlainCodec(), LENGTH, fed, max_clients=0)
    with pytest.raises(ValueError, match="min_train_clients=3 exceeds max_clients=2"):
        EncryptedFedAvg(PlainCodec(), LENGTH, FederationConfig(min_train_clients=3), max_clients=2)


def test_replayed_ciphertext_is_refused_in_the_round_later_and_after_a_restart(bfv_keys, tmp_path):
    client, server = _bfv(bfv_keys)
    fed = FederationConfig(rounds=3, min_train_clients=1)
    roster = NodeRoster(node_names={1: "c1", 2: "c2", 3: "c3"})
    strategy = EncryptedFedAvg(server, LENGTH, fed, roster=roster)
    honest, payloads, expected = _honest(client, np.random.default_rng(5))
    # node 3 replays node 1's ciphertext under node 1's client-id
    spoof = _reply(3, payloads[0], 30)
    spoof.content.config_records[KEY_CLIENT]["client-id"] = "c1"
    arrays, metrics = strategy.aggregate_train(1, [*honest, spoof])
    assert metrics["accepted"] == 2 and strategy.current_round.excluded == [
        (3, "duplicate ciphertext: accepted earlier in this round")
    ]
    assert [c.client_id for c in strategy.current_round.clients] == ["c1", "c2"]
    # without a roster the claimed name is taken, and only once per round
    legacy = EncryptedFedAvg(server, LENGTH, fed)
    legacy.aggregate_train(1, [*honest, spoof])
    assert legacy.current_round.excluded == [(3, "second reply for the same client this round")]
    np.testing.assert_allclose(_fedavg(client, arrays)[0], expected, atol=1e-9)
    # a later round refuses it too
    _, metrics = strategy.aggregate_train(2, [_reply(3, payloads[1], 70)])
    assert metrics["accepted"] == 0 and strategy.current_round.excluded == [
        (3, "duplicate ciphertext: accepted in an earlier round")
    ]
    # and so does a restarted server resumed from the checkpoint
    state = StateDir(tmp_path / "state")
    state.save_checkpoint(strategy, 2)
    checkpoint = state.load_checkpoint(server, LENGTH)
    # two keys (seed and c0) for each of the two accepted one-ciphertext uploads
    assert ReplayKeys.from_bytes(checkpoint.replay_keys) == strategy.replay_keys
    assert len(strategy.replay_keys) == 4
    resumed = EncryptedFedAvg(server, LENGTH, fed, round_offset=2, roster=roster)
    checkpoint.restore(resumed)
    assert resumed.latest_global is not None
    assert resumed.rng.random() == strategy.rng.random()
    fresh = client.encode(np.ones(LENGTH))
    _, metrics = resumed.aggregate_train(1, [_reply(1, payloads[0], 30), _reply(2, fresh, 1)])
    assert metrics["accepted"] == 1
    assert resumed.current_round.excluded == [
        (1, "duplicate ciphertext: accepted in an earlier round")
    ]


def test_older_checkpoints_load_and_damaged_replay_keys_are_refused(tmp_path, caplog):
    codec = PlainCodec()
    strategy = EncryptedFedAvg(codec, LENGTH, FederationConfig(rounds=2, min_train_clients=1))
    sent = codec.encode(np.ones(LENGTH))
    strategy.aggregate_train(1, [_reply(1, sent, 1)])
    state = StateDir(tmp_path)
    state.save_checkpoint(strategy, 1)
    path = tmp_path / "checkpoint.json"
    meta = json.loads(path.read_text())
    assert "payload_digests" not in meta
    assert len(base64.b64decode(meta["replay_keys"])) == 8
    # a checkpoint written before any digest was kept loads with none
    older = {k: v for k, v in meta.items() if k != "replay_keys"}
    path.write_text(json.dumps(older))
    old = state.load_checkpoint(codec, LENGTH)
    assert old is not None and old.payload_digests == frozenset() and old.replay_keys == b""
    # one with SHA-256 digests of raw payloads still refuses those bytes, and warns
    older["payload_digests"] = [hashlib.sha256(sent).hexdigest()]
    path.write_text(json.dumps(older))
    with caplog.at_level(logging.WARNING, logger="sepals"):
        old = state.load_checkpoint(codec, LENGTH)
    assert "older sepals" in caplog.text and "byte for byte only" in caplog.text
    resumed = EncryptedFedAvg(codec, LENGTH, FederationConfig(rounds=2), round_offset=1)
    old.restore(resumed)
    resumed.aggregate_train(1, [_reply(1, sent, 1)])
    assert resumed.current_round.excluded == [
        (1, "duplicate ciphertext: accepted in an earlier round")
    ]
    state.save_checkpoint(resumed, 2)  # and keeps them
    assert json.loads(path.read_text())["payload_digests"] == older["payload_digests"]
    for key, bad in (
        ("payload_digests", ["zz" * 32]),
        ("payload_digests", "abc"),
        ("payload_digests", [1]),
        ("replay_keys", "!!"),
        ("replay_keys", base64.b64encode(bytes(7)).decode()),
        ("replay_keys", 5),
    ):
        path.write_text(json.dumps({**meta, key: bad}))
        with pytest.raises(CheckpointError, match=key):
            state.load_checkpoint(codec, LENGTH)
    with pytest.raises(ValueError, match="32 bytes"):
        strategy.remember_payload_digests([b"short"])


def _eval_reply(node: int, n, loss, acc, client_id: str | None = None) -> Message:
    orig = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    metrics = MetricRecord({"num-examples": 1, "loss": 0.0, "accuracy": 0.0})
    for key, value in (("num-examples", n), ("loss", loss), ("accuracy", acc)):
        if value is None:
            del metrics._data[key]
        else:
            metrics._data[key] = value
    content = RecordDict(
        {KEY_METRICS: metrics, KEY_CLIENT: ConfigRecord({"client-id": client_id or f"c{node}"})}
    )
    return Message(content, reply_to=orig)


def test_evaluation_refuses_inflated_counts_and_impossible_accuracy():
    strategy = EncryptedFedAvg(
        PlainCodec(), LENGTH, FederationConfig(rounds=1), roster=NodeRoster(default_cap=500)
    )
    honest = [_eval_reply(1, 100, 0.5, 0.8), _eval_reply(2, 50, 0.7, 0.6)]
    attacks = [
        _eval_reply(3, 1e300, 0.0, 1.0),
        _eval_reply(4, 10**9, 0.0, 1.0),
        _eval_reply(5, 400, 0.0, 50),
        _eval_reply(6, 400, 0.0, math.nan),
        _eval_reply(7, 400, -1.0, 1.0),
        _eval_reply(8, 400, math.inf, 1.0),
        _eval_reply(9, 400, 0.0, None),
        _eval_reply(10, True, 0.0, 1.0),
        _eval_reply(11, 400, "0", 1.0),
        _eval_reply(12, 400.0, 0.0, 1.0),
    ]
    failed = Message(
        Error(code=1, reason="\x1b[1mboom\n" + "x" * 5000),
        reply_to=Message(RecordDict(), dst_node_id=13, message_type=MessageType.EVALUATE),
    )
    result = strategy.aggregate_evaluate(1, [*attacks[:5], *honest, *attacks[5:], failed])
    record = strategy.history[-1]
    assert result["accuracy"] == pytest.approx((100 * 0.8 + 50 * 0.6) / 150)
    assert result["loss"] == pytest.approx((100 * 0.5 + 50 * 0.7) / 150)
    assert record.federated_accuracy == result["accuracy"] and record.evaluated == 2
    reasons = dict(record.eval_excluded)
    assert sorted(reasons) == list(range(3, 14))
    for node in (3, 4, 10, 12):
        assert reasons[node] == "num-examples must be an integer in [1, 500]"
    assert reasons[5] == reasons[6] == reasons[9] == "accuracy must be a finite number in [0, 1]"
    assert reasons[7] == reasons[8] == reasons[11] == "loss must be a finite number in [0, inf)"
    assert reasons[13].startswith("?[1mboom?xxx") and len(reasons[13]) <= 200
    # nothing valid: no federated figure at all, rather than a skewed one
    strategy.aggregate_evaluate(2, attacks)
    assert strategy.history[-1].federated_accuracy is None


def test_a_deployment_names_nodes_by_authentication_and_caps_each(bfv_keys, caplog):
    client, server = _bfv(bfv_keys)
    roster = NodeRoster(default_cap=100, caps={"alice": 30}, node_names={1: "alice", 2: "bob"})
    fed = FederationConfig(rounds=1, min_train_clients=1)
    strategy = EncryptedFedAvg(server, LENGTH, fed, roster=roster)
    impostor = _reply(1, client.encode(np.ones(LENGTH) * _a(30)), 30)
    impostor.content.config_records[KEY_CLIENT]["client-id"] = "bob"
    stranger = _reply(3, client.encode(np.ones(LENGTH)), 1)
    with caplog.at_level(logging.DEBUG, logger="sepals"):
        strategy.aggregate_train(
            1, [impostor, _reply(2, client.encode(np.ones(LENGTH) * _a(70)), 70), stranger]
        )
    record = strategy.current_round
    assert [(c.node_id, c.client_id) for c in record.clients] == [(1, "alice"), (2, "bob")]
    assert record.excluded == [(3, "unknown node")]
    assert "claims client-id bob; recorded as alice" in caplog.text
    # alice's own cap is 30
    strategy = EncryptedFedAvg(server, LENGTH, fed, roster=roster)
    strategy.aggregate_train(1, [_reply(1, client.encode(np.ones(LENGTH)), 31)])
    assert strategy.current_round.excluded == [(1, "num-examples must be an integer in [1, 30]")]


def test_a_simulation_trusts_claimed_names_once_per_round(bfv_keys):
    client, server = _bfv(bfv_keys)
    roster = NodeRoster(default_cap=100, caps={"c1": 10}, trust_claimed_names=True)
    fed = FederationConfig(rounds=1, min_train_clients=1)
    strategy = EncryptedFedAvg(server, LENGTH, fed, roster=roster)
    too_many = _reply(1, client.encode(np.ones(LENGTH)), 20)
    bad_name = _reply(2, client.encode(np.ones(LENGTH)), 5)
    bad_name.content.config_records[KEY_CLIENT]["client-id"] = "c2\nFAKE LOG LINE"
    ok = _reply(3, client.encode(np.ones(LENGTH)), 5)
    twin = _reply(4, client.encode(np.ones(LENGTH)), 5)
    twin.content.config_records[KEY_CLIENT]["client-id"] = "c3"
    strategy.aggregate_train(1, [too_many, bad_name, ok, twin])
    record = strategy.current_round
    assert [c.client_id for c in record.clients] == ["c3"]
    reasons = dict(record.excluded)
    assert reasons[1] == "num-examples must be an integer in [1, 10]"
    assert reasons[2].startswith("client-id must be a client name")
    assert reasons[4] == "second reply for the same client this round"


def test_without_a_roster_claimed_names_are_labels_under_the_default_cap(bfv_keys):
    client, server = _bfv(bfv_keys)
    strategy = EncryptedFedAvg(server, LENGTH, FederationConfig(rounds=1, min_train_clients=1))
    assert strategy.roster == UNCONFIGURED and UNCONFIGURED.caps == {}
    strategy.aggregate_train(1, [_reply(7, client.encode(np.ones(LENGTH)), DEFAULT_EXAMPLE_CAP)])
    assert [c.client_id for c in strategy.current_round.clients] == ["c7"]
    over = _reply(7, client.encode(np.ones(LENGTH)), DEFAULT_EXAMPLE_CAP + 1)
    strategy.aggregate_train(2, [over])
    assert strategy.current_round.accepted == 0
    # a roster without names or trust names nodes by their id
    strategy = EncryptedFedAvg(server, LENGTH, FederationConfig(rounds=1), roster=NodeRoster())
    strategy.aggregate_train(1, [_reply(7, client.encode(np.ones(LENGTH)), 5)])
    assert [c.client_id for c in strategy.current_round.clients] == ["7"]


def test_replies_from_unsampled_or_repeated_nodes_are_excluded():
    codec = PlainCodec()
    fed = FederationConfig(rounds=1, fraction_train=1.0, min_train_clients=1)
    strategy = EncryptedFedAvg(codec, LENGTH, fed, node_wait_timeout=0.01)
    list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid([1, 2])))
    replies = [
        _reply(1, codec.encode(np.ones(LENGTH)), 1),
        _reply(1, codec.encode(np.ones(LENGTH) * 2), 2),
        _reply(9, codec.encode(np.ones(LENGTH) * 3), 3),
    ]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["accepted"] == 1
    assert strategy.current_round.excluded == [
        (1, "second reply from the same node this round"),
        (9, "reply from a node that was not sampled this round"),
    ]


def test_any_exception_excludes_one_reply_with_a_sanitized_reason(caplog, monkeypatch):
    codec = PlainCodec()
    strategy = EncryptedFedAvg(codec, LENGTH, FederationConfig(rounds=1, min_train_clients=1))
    poison = codec.encode(np.full(LENGTH, 7.0))
    real_validate = codec.validate_upload

    def validate(payload, expected_length=None):
        if payload == poison:
            raise RuntimeError("\x1b]0;pwned\x07 secret-looking text")
        if payload == b"SPL1-sepals-error":
            raise MalformedPayloadError("bad \x1b[31m\n" + "y" * 1000)
        return real_validate(payload, expected_length)

    monkeypatch.setattr(codec, "validate_upload", validate)

    class BrokenRoster(NodeRoster):
        def name_of(self, node_id, claimed):
            if node_id == 6:
                raise KeyError("\x1b[2J wiped")
            return super().name_of(node_id, claimed)

    strategy.roster = BrokenRoster()
    good = _reply(1, codec.encode(np.ones(LENGTH) * 4), 4)
    failed = _error(4, 1, "\x1b[31mred\r\nforged line " + "z" * 10_000)
    declined = _error(5, ERR_BUDGET_EXHAUSTED, "budget\x00spent")
    replies = [_reply(2, poison, 1), good, _reply(3, b"SPL1-sepals-error", 1), failed, declined]
    replies.append(_reply(6, codec.encode(np.ones(LENGTH)), 1))
    with caplog.at_level(logging.DEBUG, logger="sepals"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["accepted"] == 1
    record = strategy.current_round
    reasons = dict(record.excluded)
    assert reasons[2] == "malformed payload"
    assert reasons[6] == "malformed reply"
    assert reasons[3].startswith("MalformedPayloadError: bad ?[31m?yyy") and len(reasons[3]) == 200
    assert reasons[4].startswith("?[31mred??forged line zzz") and len(reasons[4]) == 200
    assert record.declined == [(5, "budget?spent")]
    for _, reason in [*record.excluded, *record.declined]:
        assert reason.isprintable()
    assert "\x1b" not in caplog.text and "pwned" not in caplog.text and "wiped" not in caplog.text


def test_roster_checks_its_settings():
    for kwargs in (
        {"default_cap": 0},
        {"default_cap": True},
        {"default_cap": 1.5},
        {"caps": {"a": 0}},
        {"caps": {"bad name": 3}},
        {"node_names": {1: ""}},
        {"node_names": {-1: "a"}},
        {"node_names": {1: "a"}, "trust_claimed_names": True},
        {"trust_claimed_names": "yes"},
    ):
        with pytest.raises(ValueError):
            NodeRoster(**kwargs)
    roster = NodeRoster(caps={"a": 3}, node_names={4: "a"})
    assert roster.name_of(4, "b") == "a" and roster.cap_of("a") == 3
    assert roster.cap_of("b") == DEFAULT_EXAMPLE_CAP
    with pytest.raises(RosterError, match="unknown node"):
        roster.name_of(5, "a")
    with pytest.raises(TypeError):
        roster.caps["a"] = 100  # type: ignore[index]


def test_default_federation_asks_no_node_to_evaluate():
    # Federated evaluation sends each node's loss, accuracy and example count in the
    # clear; with the default settings the server never asks for them.
    client = PlainCodec()
    for fraction, asked in ((None, 0), (1.0, 3)):
        fed = FederationConfig(rounds=1, min_train_clients=1)
        if fraction is not None:
            fed = FederationConfig(rounds=1, min_train_clients=1, fraction_evaluate=fraction)
        strategy = EncryptedFedAvg(client, LENGTH, fed)
        arrays, _ = strategy.aggregate_train(1, [_reply(1, client.encode(np.ones(LENGTH)), 10)])
        assert arrays is not None
        sent = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), _Grid([1, 2, 3])))
        assert len(sent) == asked
        assert fed.evaluation_disclosure.startswith("off" if asked == 0 else "on (1 of")


def test_round_record_carries_the_largest_replace_one_epsilon():
    strategy = EncryptedFedAvg(
        PlainCodec(), LENGTH, FederationConfig(rounds=1, min_train_clients=1)
    )
    client = PlainCodec()
    replies = [
        _reply(node, client.encode(np.full(LENGTH, node)), 10, eps=1.0 + node) for node in (1, 2)
    ]
    for node, msg in zip((1, 2), replies, strict=True):
        _set_metric(msg, "epsilon-replace-one", 3.0 * node)
    bad = _set_metric(_reply(3, client.encode(np.full(LENGTH, 3)), 10), "epsilon-replace-one", -1.0)
    _, metrics = strategy.aggregate_train(1, [*replies, bad])
    record = strategy.current_round
    assert [c.epsilon_replace_one for c in record.clients] == [3.0, 6.0]
    assert (record.max_epsilon, record.max_epsilon_replace_one) == (3.0, 6.0)
    assert metrics["max-epsilon-replace-one"] == 6.0 and metrics["excluded"] == 1
    assert "epsilon-replace-one" in record.excluded[0][1]
