"""The federation plan: clients serve only the operator's signed rounds that match it.

The attack this guards against: a run the operator did not start (another app under
the sepals name, another federation, or a config with ``rounds = 1`` to make sigma
tiny) made real clients spend their whole budget in one round. Here every such round
is refused with a short reason, and the ledger file stays byte-identical.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from hypothesis import given, settings
from torch.utils.data import TensorDataset

from sepals.client.app import LEDGER_STATE_KEY, client_for, make_client_app
from sepals.client.core import ClientRuntime, SepalsClient
from sepals.client.failures import vetted_reason
from sepals.client.privacy import calibrate_noise_multiplier, planned_participation
from sepals.common.codec import PlainCodec
from sepals.common.config import MAX_COEFF_MODULUS_BITS, EncryptionConfig, PrivacyConfig
from sepals.common.errors import BudgetExhaustedError, MalformedPayloadError, TrainingInputError
from sepals.common.federation import FederationConfig
from sepals.common.plan import (
    KEY_FEDERATION_ID,
    KEY_SIGNATURE,
    LEGACY_RING,
    FederationPlan,
    PlanViolationError,
)
from sepals.common.protocol import (
    ERR_CLIENT_FAILURE,
    ERR_PLAN_MISMATCH,
    KEY_CONFIG,
    KEY_GLOBAL,
    RoundConfig,
    plan_conflicts,
)
from sepals.common.records import global_record
from sepals.common.round_signature import (
    OperatorSigner,
    generate_operator_key,
    global_model_digest,
    signed_bytes,
    verify_round_signature,
)
from sepals.server.serverapp.strategy import EncryptedFedAvg

pytestmark = pytest.mark.usefixtures("run_identity")

FED = FederationConfig(rounds=3, min_train_clients=1, batch_size=8, learning_rate=0.1)
PRIVACY = PrivacyConfig(target_epsilon=4.0)
NODE = 7


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 2))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(40, 4, generator=g), torch.randint(0, 2, (40,), generator=g))


@pytest.fixture(scope="module")
def operator() -> tuple[bytes, FederationPlan]:
    private, public = generate_operator_key()
    plan = FederationPlan.create(FED, PlainCodec.name, PlainCodec().fingerprint_hex, 10, public)
    return private, plan


def _runtime(plan: FederationPlan, ledger: Path | None) -> ClientRuntime:
    return ClientRuntime(
        client_id="c1",
        model_factory=_model,
        train_data=_data(),
        test_data=_data(),
        privacy=PRIVACY,
        encryption=EncryptionConfig(scheme="none"),
        plan=plan,
        ledger_path=ledger,
    )


def _message(config: dict[str, Any], arrays: ArrayRecord, kind: str = MessageType.TRAIN) -> Message:
    content = RecordDict({KEY_GLOBAL: arrays, KEY_CONFIG: ConfigRecord(config)})
    return Message(content, dst_node_id=NODE, message_type=kind)


def _context() -> Context:
    return Context(run_id=1, node_id=NODE, node_config={}, state=RecordDict(), run_config={})


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [NODE]


def _operator_round(
    private: bytes, plan: FederationPlan, server_round: int, arrays: ArrayRecord
) -> Message:
    """The round the operator's strategy sends (the real EncryptedFedAvg, signing)."""
    strategy = EncryptedFedAvg(
        PlainCodec(),
        plan.vector_length,
        FED,
        round_signer=OperatorSigner(private, plan.federation_id),
    )
    (msg,) = strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid())  # type: ignore[arg-type]
    return msg


def _global(weight_total: float = 40.0) -> ArrayRecord:
    return global_record(PlainCodec().encode(np.full(10, 0.5) * weight_total), weight_total)


# --------------------------------------------------------------------------- the plan
def test_plan_round_trips_and_ids_are_random(operator: tuple[bytes, FederationPlan]) -> None:
    _, plan = operator
    again = FederationPlan.from_json(plan.to_json())
    assert again == plan
    other = FederationPlan.create(FED, plan.codec, plan.key_fingerprint, 10, plan.operator_key)
    assert other.federation_id != plan.federation_id and len(other.federation_id) == 32
    for r in range(1, FED.rounds + 1):
        assert plan.learning_rate_at(r) == FED.learning_rate_at(r)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("federation_id", "xyz", "plan.federation_id"),
        ("federation_id", "A" * 32, "plan.federation_id"),
        ("rounds", 0, "plan.rounds"),
        ("rounds", 2.5, "plan.rounds"),
        ("rounds", True, "plan.rounds"),
        ("fraction_train", 0.0, "plan.fraction_train"),
        ("fraction_train", 1.5, "plan.fraction_train"),
        ("fraction_train", float("nan"), "plan.fraction_train"),
        ("local_epochs", "1", "plan.local_epochs"),
        ("batch_size", 0, "plan.batch_size"),
        ("learning_rate", -0.1, "plan.learning_rate"),
        ("learning_rate", float("inf"), "plan.learning_rate"),
        ("lr_schedule", "step", "plan.lr_schedule"),
        ("momentum", 1.0, "plan.momentum"),
        ("model_seed", -1, "plan.model_seed"),
        ("codec", "", "plan.codec"),
        ("key_fingerprint", "00", "plan.key_fingerprint"),
        ("vector_length", 0, "plan.vector_length"),
        ("operator_key", "ab", "plan.operator_key"),
    ],
)
def test_plan_fields_are_checked(
    operator: tuple[bytes, FederationPlan], field: str, value: object, match: str
) -> None:
    _, plan = operator
    raw = plan.to_dict()
    raw[field] = value
    with pytest.raises(ValueError, match=match) as info:
        FederationPlan.from_dict(raw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"format": "other"}', "plan.format"),
        ('{"format": "sepals-plan/1", "rounds": 3}', "plan lacks"),
    ],
)
def test_malformed_plan_json(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FederationPlan.from_json(text)


def test_unknown_plan_keys_are_refused(operator: tuple[bytes, FederationPlan]) -> None:
    raw = operator[1].to_dict() | {"rounds_override": 1}
    with pytest.raises(ValueError, match="rounds_override"):
        FederationPlan.from_dict(raw)


def test_plan_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read plan"):
        FederationPlan.load(tmp_path / "none.json")
    bad = tmp_path / "plan.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match=str(bad)):
        FederationPlan.load(bad)


def _bfv_plan(plan: FederationPlan, ring: int | None) -> dict[str, Any]:
    raw = plan.to_dict() | {"codec": "bfv-q2"}
    if ring is None:
        del raw["poly_modulus_degree"]
    else:
        raw["poly_modulus_degree"] = ring
    return raw


@settings(max_examples=60, deadline=None)
@given(ring=st.sampled_from(sorted(MAX_COEFF_MODULUS_BITS)))
def test_plan_ring_round_trips(operator: tuple[bytes, FederationPlan], ring: int) -> None:
    parsed = FederationPlan.from_dict(_bfv_plan(operator[1], ring))
    assert parsed.poly_modulus_degree == parsed.ring_degree == ring
    assert FederationPlan.from_json(parsed.to_json()) == parsed
    assert json.loads(parsed.to_json())["poly_modulus_degree"] == ring


@settings(max_examples=120, deadline=None)
@given(
    value=st.one_of(
        st.integers(),
        st.floats(allow_nan=True),
        st.booleans(),
        st.text(max_size=6),
        st.none(),
        st.lists(st.integers(), max_size=2),
    )
)
def test_plan_ring_values_are_checked(
    operator: tuple[bytes, FederationPlan], value: object
) -> None:
    """Only an integer ring SEAL supports passes for an HE codec, only 0 for plaintext."""
    rings = sorted(MAX_COEFF_MODULUS_BITS)
    valid_int = isinstance(value, int) and not isinstance(value, bool)
    bfv = _bfv_plan(operator[1], 0) | {"poly_modulus_degree": value}
    if valid_int and value in rings:
        assert FederationPlan.from_dict(bfv).poly_modulus_degree == value
    else:
        with pytest.raises(ValueError, match=r"plan\.poly_modulus_degree") as info:
            FederationPlan.from_dict(bfv)
        assert "\n" not in str(info.value)
    plain = operator[1].to_dict() | {"poly_modulus_degree": value}
    if valid_int and value == 0:
        assert FederationPlan.from_dict(plain).poly_modulus_degree == 0
    else:
        with pytest.raises(ValueError, match=r"plan\.poly_modulus_degree"):
            FederationPlan.from_dict(plain)


def test_plans_without_a_ring_mean_the_old_default(operator: tuple[bytes, FederationPlan]) -> None:
    """A plan written before the ring was recorded: its HE keys are N = 8192."""
    old_bfv = FederationPlan.from_dict(_bfv_plan(operator[1], None))
    assert old_bfv.poly_modulus_degree == LEGACY_RING == 8192
    old_plain = operator[1].to_dict()
    del old_plain["poly_modulus_degree"]
    assert FederationPlan.from_dict(old_plain).poly_modulus_degree == 0
    # once written, a plan always names its ring
    assert json.loads(old_bfv.to_json())["poly_modulus_degree"] == 8192


def test_client_refuses_keys_of_another_ring(operator: tuple[bytes, FederationPlan]) -> None:
    """A plan for N = 4096 with a client holding N = 8192 keys (same fingerprint forged)."""
    from sepals.common.scheme import generate_secret_context, make_client_codec

    encryption = EncryptionConfig(max_clients=10)
    secret = generate_secret_context(encryption)
    codec = make_client_codec(encryption, secret)
    plan = dataclasses.replace(
        operator[1],
        codec=codec.name,
        key_fingerprint=codec.fingerprint_hex,
        poly_modulus_degree=4096,
    )
    runtime = dataclasses.replace(
        _runtime(plan, None), encryption=encryption, secret_context=secret
    )
    with pytest.raises(ValueError, match="HE ring N=4096"):
        SepalsClient(runtime)
    SepalsClient(
        dataclasses.replace(runtime, plan=dataclasses.replace(plan, poly_modulus_degree=8192))
    )


# --------------------------------------------------------------------------- signatures
def test_signature_covers_every_field_the_type_and_the_model(
    operator: tuple[bytes, FederationPlan],
) -> None:
    private, plan = operator
    signer = OperatorSigner(private, plan.federation_id)
    arrays = _global()
    config = signer(MessageType.TRAIN, RoundConfig.for_plan(plan, 2).to_record_dict(), arrays)
    digest = global_model_digest((PlainCodec().encode(np.full(10, 20.0)), 40.0))
    verify_round_signature(plan, MessageType.TRAIN, config, digest)

    def refused(cfg: dict[str, Any], kind: str = MessageType.TRAIN, dig: str = digest) -> str:
        with pytest.raises(PlanViolationError) as info:
            verify_round_signature(plan, kind, cfg, dig)
        return info.value.reason

    for key in config:
        if key in (KEY_SIGNATURE, KEY_FEDERATION_ID):
            continue
        changed = dict(config)
        value = changed[key]
        changed[key] = value + "0" if isinstance(value, str) else value * 2 + 1
        assert refused(changed) == "bad signature", key
        dropped = {k: v for k, v in config.items() if k != key}
        assert refused(dropped) == "bad signature", key
    assert refused(config | {"extra": 1}) == "bad signature"
    assert refused(config, kind=MessageType.EVALUATE) == "bad signature"
    other_model = global_model_digest((PlainCodec().encode(np.full(10, 21.0)), 40.0))
    assert refused(config, dig=other_model) == "bad signature"
    other_total = global_model_digest((PlainCodec().encode(np.full(10, 20.0)), 41.0))
    assert refused(config, dig=other_total) == "bad signature"
    assert refused(config, dig=global_model_digest(None)) == "bad signature"
    assert refused(config | {KEY_SIGNATURE: "zz"}) == "bad signature"
    assert refused({k: v for k, v in config.items() if k != KEY_SIGNATURE}) == "unsigned round"
    assert refused(config | {KEY_FEDERATION_ID: "0" * 32}) == "foreign federation"
    assert refused({k: v for k, v in config.items() if k != KEY_FEDERATION_ID}) == (
        "foreign federation"
    )
    stranger, _ = generate_operator_key()
    forged = OperatorSigner(stranger, plan.federation_id)(
        MessageType.TRAIN, RoundConfig.for_plan(plan, 2).to_record_dict(), arrays
    )
    assert refused(forged) == "bad signature"


def test_signer_checks_its_key_against_the_plan(
    operator: tuple[bytes, FederationPlan], tmp_path: Path
) -> None:
    private, plan = operator
    key = tmp_path / "operator.key"
    key.write_bytes(private)
    assert OperatorSigner.for_plan(key, plan).federation_id == plan.federation_id
    key.write_bytes(generate_operator_key()[0])
    with pytest.raises(ValueError, match="not the operator key"):
        OperatorSigner.for_plan(key, plan)
    key.write_bytes(b"not a key")
    with pytest.raises(ValueError, match="PEM"):
        OperatorSigner.for_plan(key, plan)
    with pytest.raises(ValueError, match="federation id"):
        OperatorSigner(private, "short")
    assert "BEGIN" not in repr(OperatorSigner(private, plan.federation_id))


def test_signed_bytes_refuse_non_scalars() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        signed_bytes("train", {"x": float("nan")}, "")
    with pytest.raises(ValueError, match="bytes"):
        signed_bytes("train", {"x": b"raw"}, "")


# --------------------------------------------------------------------------- the attack
def _attack_cases(private: bytes, plan: FederationPlan) -> dict[str, tuple[Message, str]]:
    """Round-2 messages that every client must refuse, and the reason it gives."""
    signer = OperatorSigner(private, plan.federation_id)
    arrays = _global()
    honest = RoundConfig.for_plan(plan, 2).to_record_dict()

    def signed(changes: dict[str, Any], kind: str = MessageType.TRAIN) -> Message:
        return _message(signer(kind, honest | changes, arrays), arrays)

    stranger, _ = generate_operator_key()
    intruder = dict(honest, rounds=1, **{"fraction-train": 1.0})
    cases = {
        # The reported attack: another run's config, unsigned, with rounds = 1.
        "unsigned intruder": (_message(intruder, arrays), "foreign federation"),
        "unsigned with our id": (
            _message(intruder | {KEY_FEDERATION_ID: plan.federation_id}, arrays),
            "unsigned round",
        ),
        "signed by another key": (
            _message(
                OperatorSigner(stranger, plan.federation_id)("train", intruder, arrays), arrays
            ),
            "bad signature",
        ),
        "another federation": (
            _message(OperatorSigner(private, "f" * 32)("train", honest, arrays), arrays),
            "foreign federation",
        ),
        "operator signs rounds=1": (signed({"rounds": 1}), "plan mismatch: rounds"),
        "fraction": (signed({"fraction-train": 0.01}), "plan mismatch: fraction-train"),
        "epochs": (signed({"local-epochs": 50}), "plan mismatch: local-epochs"),
        "batch": (signed({"batch-size": 1}), "plan mismatch: batch-size"),
        "lr off by 1e-9": (
            signed({"learning-rate": honest["learning-rate"] * (1 + 1e-9)}),
            "plan mismatch: learning-rate",
        ),
        "momentum": (signed({"momentum": 0.0}), "plan mismatch: momentum"),
        "model seed": (signed({"model-seed": 1}), "plan mismatch: model-seed"),
        "codec": (signed({"codec": "ckks"}), "plan mismatch: codec"),
        "key": (signed({"key-fingerprint": "0" * 32}), "plan mismatch: key-fingerprint"),
        "size": (signed({"vector-length": 11}), "plan mismatch: vector-length"),
        "float rounds": (signed({"rounds": 3.0}), "plan mismatch: rounds"),
        "bool seed": (signed({"model-seed": False}), "plan mismatch: model-seed"),
        "extra field": (signed({"noise-multiplier": 0.01}), "plan mismatch: unexpected field"),
        "missing field": (
            _message(
                signer("train", {k: v for k, v in honest.items() if k != "rounds"}, arrays), arrays
            ),
            "malformed round config",
        ),
        "past the plan": (
            _message(
                signer("train", RoundConfig.for_plan(plan, 4).to_record_dict(), arrays), arrays
            ),
            "round past the plan",
        ),
        "round zero": (signed({"server-round": 0}), "plan mismatch: server-round"),
        "already trained": (
            _message(
                signer("train", RoundConfig.for_plan(plan, 1).to_record_dict(), arrays), arrays
            ),
            "round already trained",
        ),
        "replayed with another model": (
            _message(signer("train", honest, arrays), _global(weight_total=1e-9)),
            "bad signature",
        ),
        "evaluate signature on a train": (signed({}, kind=MessageType.EVALUATE), "bad signature"),
    }
    return cases


def test_foreign_or_deviating_rounds_are_refused_and_spend_nothing(
    operator: tuple[bytes, FederationPlan], tmp_path: Path
) -> None:
    private, plan = operator
    ledger = tmp_path / "ledger.json"
    app = make_client_app(lambda _ctx: _runtime(plan, ledger))
    context = _context()
    # Control: the operator's round 1 trains and is recorded (so the test can fail).
    reply = app(message=_operator_round(private, plan, 1, ArrayRecord()), context=context)
    assert not reply.has_error(), reply.error
    assert json.loads(ledger.read_text())["ledger"]["rounds"] == [1]
    before, state_before = ledger.read_bytes(), context.state[LEDGER_STATE_KEY]
    cases = _attack_cases(private, plan)
    assert len(cases) >= 20
    for name, (msg, reason) in cases.items():
        reply = app(message=msg, context=context)
        assert reply.has_error(), name
        assert (reply.error.code, reply.error.reason) == (ERR_PLAN_MISMATCH, reason), name
        assert ledger.read_bytes() == before, name
        assert context.state[LEDGER_STATE_KEY] == state_before, name
    # The operator's real round 2 is still served after all that.
    reply = app(message=_operator_round(private, plan, 2, _global()), context=context)
    assert not reply.has_error(), reply.error
    assert json.loads(ledger.read_text())["ledger"]["rounds"] == [1, 2]


def test_evaluate_needs_the_signature_too(operator: tuple[bytes, FederationPlan]) -> None:
    private, plan = operator
    app = make_client_app(lambda _ctx: _runtime(plan, None))
    arrays = _global()
    config = RoundConfig.for_plan(plan, 2).to_record_dict()
    unsigned = app(message=_message(config, arrays, MessageType.EVALUATE), context=_context())
    assert (unsigned.error.code, unsigned.error.reason) == (ERR_PLAN_MISMATCH, "foreign federation")
    signer = OperatorSigner(private, plan.federation_id)
    as_train = _message(signer(MessageType.TRAIN, config, arrays), arrays, MessageType.EVALUATE)
    reply = app(message=as_train, context=_context())
    assert reply.error.reason == "bad signature"
    good = _message(signer(MessageType.EVALUATE, config, arrays), arrays, MessageType.EVALUATE)
    reply = app(message=good, context=_context())
    assert not reply.has_error(), reply.error
    assert 0.0 <= float(reply.content["metrics"]["accuracy"]) <= 1.0


def test_sigma_comes_from_the_plan_not_the_message(
    operator: tuple[bytes, FederationPlan],
) -> None:
    """Even a config that got past admission could not move sigma: train reads the plan."""
    _, plan = operator
    client = SepalsClient(_runtime(plan, None))
    from sepals.client.privacy import PrivacyLedger, poisson_schedule

    lying = dataclasses.replace(
        RoundConfig.for_plan(plan, 1), rounds=1, fraction_train=0.01, batch_size=1
    )
    reply = client.train(lying, None, PrivacyLedger.empty(PRIVACY))
    q, steps = poisson_schedule(40, plan.batch_size, plan.local_epochs)
    planned = planned_participation(plan.rounds, plan.fraction_train)
    assert reply.ledger.planned_rounds == planned
    assert reply.ledger.noise_multiplier == calibrate_noise_multiplier(
        PRIVACY.target_epsilon, PRIVACY.delta, q, planned * steps, PRIVACY.accountant
    )
    assert reply.ledger.sample_rate == q


def test_client_refuses_a_plan_that_does_not_fit_it(operator: tuple[bytes, FederationPlan]) -> None:
    _, plan = operator
    with pytest.raises(ValueError, match="parameters"):
        SepalsClient(_runtime(dataclasses.replace(plan, vector_length=11), None))
    with pytest.raises(ValueError, match="codec"):
        SepalsClient(
            _runtime(dataclasses.replace(plan, codec="bfv-q2", poly_modulus_degree=8192), None)
        )
    with pytest.raises(ValueError, match="HE key"):
        SepalsClient(_runtime(dataclasses.replace(plan, key_fingerprint="0" * 32), None))


def test_train_reply_metrics_are_the_documented_set(
    operator: tuple[bytes, FederationPlan],
) -> None:
    private, plan = operator
    app = make_client_app(lambda _ctx: _runtime(plan, None))
    reply = app(message=_operator_round(private, plan, 1, ArrayRecord()), context=_context())
    assert set(reply.content["metrics"]) == {
        "num-examples",
        "total-steps",
        "rounds-participated",
        "quant-error",
        "epsilon",
        "epsilon-replace-one",
        "delta",
        "noise-multiplier",
        "sample-rate",
        "clamped-values",
    }
    assert set(reply.content["client"]) == {"client-id", "accountant"}


# --------------------------------------------------------------------------- error reasons
@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (
            RuntimeError("boom at /home/alice/secret.ctx"),
            ERR_CLIENT_FAILURE,
            "the app's model, data or loss raised RuntimeError",
        ),
        (KeyError("weights"), ERR_CLIENT_FAILURE, "client failure"),
        (
            ValueError("x = 0.123456"),
            ERR_CLIENT_FAILURE,
            "the app's model, data or loss raised ValueError",
        ),
        (
            TrainingInputError("loss is not a batch mean", "loss = 0.123456 per example"),
            ERR_CLIENT_FAILURE,
            "loss is not a batch mean",
        ),
        (MalformedPayloadError("chunk 3 has 17 bytes"), None, "malformed global model"),
        (
            PlanViolationError("bad signature", "InvalidSignature"),
            ERR_PLAN_MISMATCH,
            "bad signature",
        ),
    ],
)
def test_error_replies_carry_a_vetted_reason(
    operator: tuple[bytes, FederationPlan],
    monkeypatch: pytest.MonkeyPatch,
    exc: Exception,
    code: int | None,
    reason: str,
) -> None:
    private, plan = operator
    runtime = _runtime(plan, None)

    def fail(*_args: object, **_kw: object) -> None:
        raise exc

    monkeypatch.setattr(client_for(runtime), "train", fail)
    app = make_client_app(lambda _ctx: runtime)
    reply = app(message=_operator_round(private, plan, 1, ArrayRecord()), context=_context())
    assert reply.error.reason == reason
    if code is not None:
        assert reply.error.code == code
    assert vetted_reason(exc)[1] == reason


def test_budget_reason_names_only_epsilon_figures() -> None:
    exc = BudgetExhaustedError("privacy budget exhausted: epsilon spent 3.000 ...")
    assert vetted_reason(exc)[1].startswith("privacy budget exhausted")


# --------------------------------------------------------------------------- server side
def test_plan_conflicts_tell_a_drifted_server(operator: tuple[bytes, FederationPlan]) -> None:
    _, plan = operator
    codec, key = plan.codec, plan.key_fingerprint
    assert plan_conflicts(plan, FED, codec, key, 10) == []
    assert plan_conflicts(plan, dataclasses.replace(FED, rounds=30), codec, key, 10)[0] == "rounds"
    drifted = dataclasses.replace(FED, learning_rate=0.2, batch_size=4)
    assert plan_conflicts(plan, drifted, codec, key, 10) == ["batch-size", "learning-rate"]
    assert plan_conflicts(plan, FED, "ckks", key, 11) == ["codec", "vector-length"]


def test_signed_rounds_survive_flowers_wire_format(operator: tuple[bytes, FederationPlan]) -> None:
    """Deployed messages travel as protobuf: types and bytes must come out as signed."""
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage  # type: ignore[attr-defined]

    private, plan = operator
    sent = _operator_round(private, plan, 2, _global())
    wire = message_to_proto(sent).SerializeToString()
    received = message_from_proto(ProtoMessage.FromString(wire))
    app = make_client_app(lambda _ctx: _runtime(plan, None))
    reply = app(message=received, context=_context())
    assert not reply.has_error(), reply.error


def test_integer_valued_numbers_read_the_same(operator: tuple[bytes, FederationPlan]) -> None:
    _, plan = operator
    raw = plan.to_dict() | {"fraction_train": 1, "momentum": 0}
    again = FederationPlan.from_dict(raw)
    assert isinstance(again.fraction_train, float) and isinstance(again.momentum, float)
    config = RoundConfig.for_plan(again, 1).to_record_dict() | {"fraction-train": 1}
    assert RoundConfig.admitted(again, config) == RoundConfig.for_plan(again, 1)
