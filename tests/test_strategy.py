from __future__ import annotations

import logging

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

from sepals.common.codec import CkksCodec, PlainCodec, generate_secret_context, unpack_payload
from sepals.common.config import EncryptionConfig, FederationConfig
from sepals.common.protocol import (
    ERR_BUDGET_EXHAUSTED,
    KEY_CLIENT,
    KEY_METRICS,
    KEY_PAYLOAD,
    KEY_UPDATE,
    payload_array,
    read_global_record,
)
from sepals.server.strategy import EncryptedFedAvg

CFG = EncryptionConfig(scheme="ckks")
LENGTH = 50


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
    strategy = EncryptedFedAvg(server, LENGTH, FederationConfig(rounds=1))
    rng = np.random.default_rng(0)
    good = {1: (rng.normal(size=LENGTH), 30), 2: (rng.normal(size=LENGTH), 70)}
    replies = [_reply(node, client.encode(w * n), n) for node, (w, n) in good.items()]
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
    assert weight_total == 100
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
    replies = [_reply(i + 1, codec.encode(w * n), n) for i, (w, n) in enumerate(models)]
    arrays, _ = strategy.aggregate_train(1, replies)
    payload, total = read_global_record(arrays)
    expected = sum(w * n for w, n in models) / 60
    np.testing.assert_allclose(codec.decode(payload) / total, expected, atol=1e-5)


def test_strategy_rejects_bad_length():
    with pytest.raises(ValueError, match="vector_length"):
        EncryptedFedAvg(PlainCodec(), 0, FederationConfig())


def test_quantization_error_bound_of_the_round():
    """The round's error bound is sum(client rounding errors) / sum(examples)."""
    codec = PlainCodec()
    strategy = EncryptedFedAvg(codec, LENGTH, FederationConfig(rounds=1))
    replies = []
    for node, (n, err) in enumerate([(10, 0.2), (30, 0.4)], start=1):
        reply = _reply(node, codec.encode(np.ones(LENGTH) * n), n)
        reply.content[KEY_METRICS]["quant-error"] = err
        replies.append(reply)
    _, metrics = strategy.aggregate_train(1, replies)
    record = strategy.current_round
    assert record.codec == "plain-fp32"
    assert record.quant_error == pytest.approx(0.6 / 40)
    assert metrics["quant-error"] == pytest.approx(0.6 / 40)
    assert [c.quant_error for c in record.clients] == [0.2, 0.4]
    # a client that does not report its error leaves the bound unknown
    strategy = EncryptedFedAvg(codec, LENGTH, FederationConfig(rounds=1))
    strategy.aggregate_train(1, [*replies, _reply(9, codec.encode(np.ones(LENGTH)), 5)])
    assert strategy.current_round.quant_error is None
