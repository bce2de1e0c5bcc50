"""The sepals Flower ClientApp.

:func:`make_client_app` binds a :class:`ClientRuntime` provider (a callable that builds
the runtime from Flower's ``Context``) to a ``ClientApp``. The privacy ledger lives in
``Context.state`` (kept by the SuperNode across rounds) and, when the runtime names a
ledger file, on disk as well.

A message that does not follow the sepals protocol (a stock Flower strategy such as
``FedAvg`` sends ``arrays`` and a ``config`` without the sepals round fields) gets one
error reply naming the protocol mismatch, before the client loads anything.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from logging import WARNING
from typing import Any

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

import sepals.client.explain_round as explain_round
import sepals.client.masking as masking
from sepals.client.core import ClientRuntime, SepalsClient
from sepals.client.failures import FailureHook, logged_failure
from sepals.client.masking import MaskState
from sepals.client.privacy import PrivacyLedger
from sepals.common.bfv import BfvCodec
from sepals.common.errors import MalformedPayloadError, MaskProtocolError
from sepals.common.explain_spec import KEY_RELEASE
from sepals.common.log import log
from sepals.common.plan import PlanViolationError
from sepals.common.protocol import (
    KEY_CLIENT,
    KEY_CONFIG,
    KEY_GLOBAL,
    KEY_MASK,
    KEY_METRICS,
    KEY_SETUP_ERROR,
    KEY_UNMASK,
    KEY_UPDATE,
    RoundConfig,
)
from sepals.common.records import KEY_PAYLOAD, GlobalModel, payload_array, read_global_model

RuntimeProvider = Callable[[Context], ClientRuntime]
LEDGER_STATE_KEY = "sepals-ledger"
MASK_STATE_KEY = "sepals-mask"
MASK_SHARE_KEY = "sepals-mask-share"

# Error code of the reply to a message that does not follow the sepals protocol.
ERR_PROTOCOL_MISMATCH = 4105
PROTOCOL_MISMATCH_REASON = (
    "protocol mismatch: this is a sepals client; the server is not a sepals server"
)
# Round-config fields only a sepals server sends (a stock config has 'server-round').
_SEPALS_CONFIG_FIELDS = ("codec", "key-fingerprint", "vector-length")


def protocol_mismatch(msg: Message) -> str | None:
    """What makes ``msg`` a message from a non-sepals server, or ``None`` if nothing does.

    A sepals train or evaluate message carries a ``config`` ConfigRecord with the sepals
    round fields and a ``global`` ArrayRecord (empty in round 1), and no other
    ArrayRecord. A stock Flower strategy sends ``arrays`` and a ``config`` without them.
    """
    content = msg.content
    config = content.config_records.get(KEY_CONFIG)
    if config is None:
        return f"message lacks the sepals {KEY_CONFIG!r} record"
    missing = [k for k in _SEPALS_CONFIG_FIELDS if k not in config]
    if missing:
        return f"round config lacks the sepals field(s) {', '.join(map(repr, missing))}"
    others = sorted(str(k) for k in content.array_records if k != KEY_GLOBAL)
    if others:
        return f"message carries ArrayRecord {others[0]!r} instead of the sepals {KEY_GLOBAL!r}"
    return None


def _mismatch_reply(msg: Message, context: Context, detail: str) -> Message:
    log(
        WARNING,
        "node %s: %s (%s)",
        context.node_id,
        PROTOCOL_MISMATCH_REASON,
        detail,
    )
    return Message(Error(code=ERR_PROTOCOL_MISMATCH, reason=PROTOCOL_MISMATCH_REASON), reply_to=msg)


def load_ledger(context: Context, runtime: ClientRuntime) -> PrivacyLedger:
    """The client's ledger: its file if the runtime names one, else ``context.state``.

    With a file, the file is authoritative; if ``context.state`` holds a ledger with more
    steps (it can only be the same client's), the larger spend wins, so a lost or stale
    file never under-counts.
    """
    record = context.state.get(LEDGER_STATE_KEY)
    in_state = None
    if isinstance(record, ConfigRecord) and "json" in record:
        in_state = PrivacyLedger.from_json(str(record["json"]))
    if runtime.ledger_path is None:
        return in_state if in_state is not None else PrivacyLedger.empty(runtime.privacy)
    on_disk = PrivacyLedger.load(runtime.ledger_path, runtime.privacy)
    if in_state is not None and in_state.steps > on_disk.steps:
        return in_state
    return on_disk


def store_ledger(context: Context, runtime: ClientRuntime, ledger: PrivacyLedger) -> None:
    """Record ``ledger`` in the file (atomically, first) and in ``context.state``."""
    if runtime.ledger_path is not None:
        ledger.save(runtime.ledger_path, runtime.client_id)
    context.state[LEDGER_STATE_KEY] = ConfigRecord({"json": ledger.to_json()})


@functools.lru_cache(maxsize=4096)
def client_for(runtime: ClientRuntime) -> SepalsClient:
    """One client per runtime and process: the key context is loaded once, not per message.

    Building one costs tens of milliseconds (the model is built and checked for DP);
    a simulation worker serves many clients, each with several messages per round, so
    the cache holds every client a worker plays (a client is small: its runtime is
    cached anyway, and the codec is shared).

    Module level, so that the ClientApp pickled to simulation workers refers to it by name.
    """
    return SepalsClient(runtime)


def _error_reply(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _guarded(
    msg: Message,
    context: Context,
    action: str,
    work: Callable[[], Message],
    on_failure: FailureHook | None = None,
) -> Message:
    """Run ``work``; turn every failure into an error reply with a vetted reason.

    A message that does not follow the sepals protocol gets the protocol-mismatch error
    instead, before anything is loaded.
    """
    mismatch = protocol_mismatch(msg)
    if mismatch is not None:
        return _mismatch_reply(msg, context, mismatch)
    try:
        return work()
    except Exception as exc:
        code, reason = logged_failure(context, action, exc, msg, on_failure)
        return _error_reply(msg, code, reason)


def _mask_states(context: Context) -> list[MaskState]:
    record = context.state.get(MASK_STATE_KEY)
    if isinstance(record, ConfigRecord) and "json" in record:
        return [MaskState.from_json(text) for text in json.loads(str(record["json"]))]
    return []


def load_mask_state(context: Context, server_round: int | None = None) -> MaskState | None:
    """The node's masking state of ``server_round`` (``None``: its latest), if any."""
    states = _mask_states(context)
    if server_round is None:
        return states[-1] if states else None
    return next((st for st in states if st.server_round == server_round), None)


def store_mask_state(context: Context, state: MaskState) -> None:
    """Keep ``state`` in ``context.state``, beside its neighbouring round's, if open.

    Two rounds can be open at once: one set up, the one before awaiting its unmask.
    """
    kept = [st for st in _mask_states(context) if abs(st.server_round - state.server_round) == 1]
    states = sorted([*kept, state], key=lambda st: st.server_round)
    text = json.dumps([st.to_json() for st in states])
    context.state[MASK_STATE_KEY] = ConfigRecord({"json": text})


def share_key(context: Context) -> bytes:
    """The node's share-encryption key for the run, made on first use (``context.state``)."""
    record = context.state.get(MASK_SHARE_KEY)
    if isinstance(record, ConfigRecord) and isinstance(record.get("sk"), bytes):
        return bytes(record["sk"])  # type: ignore[arg-type]
    key = masking.new_share_key()
    context.state[MASK_SHARE_KEY] = ConfigRecord({"sk": key})
    return key


def _mask_record(msg: Message, client: SepalsClient) -> Any:
    """The message's ``mask`` record, which the client's plan must call for.

    Raises:
        PlanViolationError: the plan masks and the message has no ``mask`` record, or
            the other way round: a client never uploads an unmasked update when its plan
            masks.

    """
    record = msg.content.config_records.get(KEY_MASK)
    if (record is None) == (client.plan.mask_neighbours > 0):
        raise PlanViolationError(
            "plan mismatch: masking",
            "unmasked round of a masked plan" if record is None else "mask of an unmasked plan",
        )
    return record


def _global_of(msg: Message) -> GlobalModel | None:
    """The message's ``global`` record, parsed; a malformed one is a bad global model."""
    try:
        return read_global_model(msg.content.array_records.get(KEY_GLOBAL))
    except ValueError as exc:
        raise MalformedPayloadError(f"global record: {exc}") from exc


def _node_of(msg: Message, context: Context) -> int:
    return int(msg.metadata.dst_node_id or context.node_id)


def make_client_app(
    provider: RuntimeProvider,
    mods: list[Mod] | None = None,
    on_failure: FailureHook | None = None,
) -> ClientApp:
    """A ``ClientApp`` that trains and evaluates with the runtime ``provider`` builds.

    Args:
        provider: Builds the :class:`ClientRuntime` from Flower's ``Context``.
        mods: Optional Flower client mods, applied around every message.
        on_failure: Told of every failure with the full exception (simulations only;
            see :data:`FailureHook`). The reply carries a vetted reason either way.

    """
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        def work() -> Message:
            runtime = provider(context)
            client = client_for(runtime)
            global_model = _global_of(msg)
            ledger = load_ledger(context, runtime)
            cfg = client.admit(
                msg.metadata.message_type,
                msg.content.config_records.get(KEY_CONFIG),
                global_model,
                ledger,
            )
            mask_record = _mask_record(msg, client)
            slot_mask = None
            if mask_record is not None:
                # Shares are opened before training: a broken setup costs no budget.
                state, slot_mask = masking.open_and_mask(
                    client.plan,
                    load_mask_state(context, cfg.server_round),
                    cfg.server_round,
                    mask_record,
                    *_slots(client, cfg),
                )
                store_mask_state(context, state)
            reply = client.train(cfg, global_model, ledger, slot_mask)
            # The spend is recorded before the update leaves the client.
            store_ledger(context, runtime, reply.ledger)
            content = RecordDict(
                {
                    KEY_UPDATE: ArrayRecord({KEY_PAYLOAD: payload_array(reply.payload)}),
                    KEY_METRICS: MetricRecord(reply.metrics),
                    KEY_CLIENT: ConfigRecord(
                        {"client-id": runtime.client_id, "accountant": reply.ledger.accountant}
                    ),
                }
            )
            return Message(content, reply_to=msg)

        return _guarded(msg, context, "train", work, on_failure)

    def admitted(
        msg: Message, context: Context, budget: bool
    ) -> tuple[ClientRuntime, SepalsClient, RoundConfig]:
        """Runtime, client and round config of a masking message the plan allows.

        With ``budget``, the round must also be one the client has not trained in and
        whose training its budget covers.
        """
        runtime = provider(context)
        client = client_for(runtime)
        ledger = load_ledger(context, runtime) if budget else None
        cfg = client.admit(
            msg.metadata.message_type,
            msg.content.config_records.get(KEY_CONFIG),
            _global_of(msg),
            ledger,
        )
        if client.plan.mask_neighbours == 0:
            raise PlanViolationError("plan mismatch: masking", "mask stage of an unmasked plan")
        if ledger is not None:
            client.check_budget(cfg, ledger)
        return runtime, client, cfg

    def reveal(client: SepalsClient, context: Context, record: Any, server_round: int) -> Any:
        state, body = masking.reveal_shares(
            client.plan, load_mask_state(context, server_round), server_round, record
        )
        store_mask_state(context, state)
        return ConfigRecord(body)

    @app.train("mask_register")
    def mask_register(msg: Message, context: Context) -> Message:
        def work() -> Message:
            runtime, _, _ = admitted(msg, context, budget=False)
            public = masking.share_public_key(share_key(context))
            content: dict[str, Any] = {
                KEY_MASK: ConfigRecord({"share-pk": public}),
                KEY_CLIENT: ConfigRecord({"client-id": runtime.client_id}),
            }
            return Message(RecordDict(content), reply_to=msg)

        return _guarded(msg, context, "register for masking", work, on_failure)

    @app.train("mask_setup")
    def mask_setup(msg: Message, context: Context) -> Message:
        def work() -> Message:
            node = _node_of(msg, context)
            runtime = provider(context)
            content: dict[str, Any] = {KEY_CLIENT: ConfigRecord({"client-id": runtime.client_id})}
            unmask = msg.content.config_records.get(KEY_UNMASK)
            if unmask is not None:
                # The previous round's unmask request, answered on its own: a failure to
                # set up this round must not lose it, nor the other way round.
                earlier = unmask.get("round")
                try:
                    if not isinstance(earlier, int) or isinstance(earlier, bool):
                        raise MaskProtocolError("unmask request names no round")
                    content[KEY_UNMASK] = reveal(client_for(runtime), context, unmask, earlier)
                except Exception as exc:
                    logged_failure(context, "reveal mask shares", exc, msg, on_failure)
            try:
                runtime, client, cfg = admitted(msg, context, budget=True)
                state, body = masking.setup_round(
                    client.plan,
                    cfg.server_round,
                    node,
                    share_key(context),
                    msg.content.config_records.get(KEY_MASK, ConfigRecord()),
                )
                store_mask_state(context, state)
                content[KEY_MASK] = ConfigRecord(body)
            except Exception as exc:
                code, reason = logged_failure(context, "set up masking", exc, msg, on_failure)
                content[KEY_SETUP_ERROR] = ConfigRecord({"code": code, "reason": reason})
            return Message(RecordDict(content), reply_to=msg)

        return _guarded(msg, context, "set up masking", work, on_failure)

    @app.train("mask_unmask")
    def mask_unmask(msg: Message, context: Context) -> Message:
        def work() -> Message:
            runtime, client, cfg = admitted(msg, context, budget=False)
            record = msg.content.config_records.get(KEY_MASK, ConfigRecord())
            if record.get("round", cfg.server_round) != cfg.server_round:
                raise MaskProtocolError("unmask request for another round")
            content: dict[str, Any] = {
                KEY_MASK: reveal(client, context, record, cfg.server_round),
                KEY_CLIENT: ConfigRecord({"client-id": runtime.client_id}),
            }
            return Message(RecordDict(content), reply_to=msg)

        return _guarded(msg, context, "reveal mask shares", work, on_failure)

    def signed_round(
        msg: Message, context: Context
    ) -> tuple[ClientRuntime, SepalsClient, GlobalModel | None, RoundConfig]:
        """Runtime, client, global model and config of a round message the plan admits."""
        runtime = provider(context)
        client = client_for(runtime)
        global_model = _global_of(msg)
        cfg = client.admit(
            msg.metadata.message_type, msg.content.config_records.get(KEY_CONFIG), global_model
        )
        return runtime, client, global_model, cfg

    @app.train("verify_global")
    def verify_global(msg: Message, context: Context) -> Message:
        """Check a round's candidate global model before the server adopts it.

        The client decrypts it and checks it as it would before training on it; the
        reply says only that it accepts (an error reply with the reason rejects it).
        """

        def work() -> Message:
            runtime, client, global_model, cfg = signed_round(msg, context)
            if global_model is None:
                raise MalformedPayloadError("no candidate global model to verify")
            client.global_weights(cfg, global_model)
            content: dict[str, Any] = {KEY_CLIENT: ConfigRecord({"client-id": runtime.client_id})}
            return Message(RecordDict(content), reply_to=msg)

        return _guarded(msg, context, "verify the global model", work, on_failure)

    @app.train("explain")
    def explain(msg: Message, context: Context) -> Message:
        """Contribute a noisy, clipped attribution sum (:mod:`sepals.client.explain_round`)."""

        def work() -> Message:
            runtime = provider(context)
            client = client_for(runtime)
            global_model = _global_of(msg)
            cfg, spec, release = explain_round.admit_explanation(
                client, msg.metadata.message_type, msg.content.config_records.get(KEY_CONFIG),
                global_model,
            )  # fmt: skip
            ledger = load_ledger(context, runtime)
            payload, metrics, after = explain_round.contribute(
                client, cfg, spec, release, global_model, ledger
            )
            store_ledger(context, runtime, after)  # the spend is recorded before it leaves
            content: dict[str, Any] = {
                KEY_UPDATE: ArrayRecord({KEY_PAYLOAD: payload_array(payload)}),
                KEY_METRICS: MetricRecord(metrics),
                KEY_CLIENT: ConfigRecord({"client-id": runtime.client_id}),
            }
            return Message(RecordDict(content), reply_to=msg)

        return _guarded(msg, context, "explain", work, on_failure)

    @app.train("explain_open")
    def explain_open(msg: Message, context: Context) -> Message:
        """Decrypt a tagged explanation sum and return the plaintext DP release."""

        def work() -> Message:
            runtime = provider(context)
            client = client_for(runtime)
            global_model = _global_of(msg)
            _, spec, _ = explain_round.admit_explanation(
                client, msg.metadata.message_type, msg.content.config_records.get(KEY_CONFIG),
                global_model,
            )  # fmt: skip
            values = explain_round.open_release(client, spec, global_model)
            content: dict[str, Any] = {
                KEY_RELEASE: ArrayRecord({KEY_RELEASE: Array(values)}),
                KEY_CLIENT: ConfigRecord({"client-id": runtime.client_id}),
            }
            return Message(RecordDict(content), reply_to=msg)

        return _guarded(msg, context, "open the explanation", work, on_failure)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        def work() -> Message:
            runtime, client, global_model, cfg = signed_round(msg, context)
            metrics = client.evaluate(cfg, global_model)
            content = RecordDict(
                {
                    KEY_METRICS: MetricRecord(metrics),
                    KEY_CLIENT: ConfigRecord({"client-id": runtime.client_id}),
                }
            )
            return Message(content, reply_to=msg)

        return _guarded(msg, context, "evaluate", work, on_failure)

    return app


def _slots(client: SepalsClient, cfg: RoundConfig) -> tuple[int, int]:
    """Slot count and plaintext modulus of this client's BFV payloads."""
    codec = client.codec
    if not isinstance(codec, BfvCodec):
        raise PlanViolationError("plan mismatch: masking", "masking needs the BFV codec")
    return codec.slot_count(cfg.vector_length), codec.plain_modulus
