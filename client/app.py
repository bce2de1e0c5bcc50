"""The sepals Flower ClientApp.

:func:`make_client_app` binds a :class:`ClientRuntime` provider (a callable that builds
the runtime from Flower's ``Context``) to a ``ClientApp``. The privacy ledger lives in
``Context.state`` (kept by the SuperNode across rounds) and, when the runtime names a
ledger file, on disk as well.

A message that does not follow the sepals protocol (a stock Flower strategy such as
``FedAvg`` sends ``arrays`` and a ``config`` without the sepals round fields) gets one
error reply naming the protocol mismatch, before the client loads anything.

``app`` is the ClientApp that ``flwr run .`` loads (``[tool.flwr.app.components]`` in
the project's ``pyproject.toml``); its clients are built by
:func:`sepals.simulations.flwr_app.client_runtime`.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from sepals.client.core import ClientRuntime, SepalsClient
from sepals.client.privacy import PrivacyLedger
from sepals.common.errors import (
    BudgetExhaustedError,
    ForeignKeyError,
    LedgerLockedError,
    MalformedPayloadError,
    NonFiniteUpdateError,
    SepalsError,
)
from sepals.common.ledger import LedgerFileError
from sepals.common.log import log
from sepals.common.plan import PlanViolationError
from sepals.common.protocol import (
    ERR_BAD_GLOBAL,
    ERR_BUDGET_EXHAUSTED,
    ERR_CLIENT_FAILURE,
    ERR_PLAN_MISMATCH,
    KEY_CLIENT,
    KEY_CONFIG,
    KEY_GLOBAL,
    KEY_METRICS,
    KEY_PAYLOAD,
    KEY_UPDATE,
    payload_array,
    read_global_record,
)

RuntimeProvider = Callable[[Context], ClientRuntime]
LEDGER_STATE_KEY = "sepals-ledger"

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


@functools.lru_cache(maxsize=8)
def client_for(runtime: ClientRuntime) -> SepalsClient:
    """One client per runtime and process: the key context is loaded once, not per message.

    Module level, so that the ClientApp pickled to simulation workers refers to it by name.
    """
    return SepalsClient(runtime)


def _error_reply(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


# What a failure may tell the server: a short fixed phrase per kind of failure. The
# exception's own text (which may quote paths, values or library internals) stays in
# the client's log.
_VETTED: tuple[tuple[type[Exception], int, str], ...] = (
    (ForeignKeyError, ERR_BAD_GLOBAL, "global model under another key"),
    (MalformedPayloadError, ERR_BAD_GLOBAL, "malformed global model"),
    (NonFiniteUpdateError, ERR_CLIENT_FAILURE, "non-finite update"),
    (LedgerFileError, ERR_CLIENT_FAILURE, "ledger unusable"),
    (LedgerLockedError, ERR_CLIENT_FAILURE, "ledger in use"),
    (ValueError, ERR_BAD_GLOBAL, "bad input"),
)


def vetted_reason(exc: BaseException) -> tuple[int, str]:
    """The error code and the short reason a client may send for ``exc``."""
    if isinstance(exc, PlanViolationError):
        return ERR_PLAN_MISMATCH, exc.reason
    if isinstance(exc, BudgetExhaustedError):
        # Built by PrivacyLedger.check_budget from the client's own epsilon figures.
        return ERR_BUDGET_EXHAUSTED, str(exc)
    for kind, code, reason in _VETTED:
        if isinstance(exc, kind):
            return code, reason
    return ERR_CLIENT_FAILURE, "client failure"


def _guarded(msg: Message, context: Context, action: str, work: Callable[[], Message]) -> Message:
    """Run ``work``; turn every failure into an error reply with a vetted reason."""
    try:
        return work()
    except Exception as exc:
        code, reason = vetted_reason(exc)
        where = f"node {context.node_id}"
        if code in (ERR_BUDGET_EXHAUSTED, ERR_PLAN_MISMATCH):
            log(INFO, "%s declines to %s: %s", where, action, exc)
        elif isinstance(exc, SepalsError | ValueError):
            log(WARNING, "%s cannot %s: %s", where, action, exc)
        else:
            log(WARNING, "%s failed to %s: %s", where, action, traceback.format_exc())
        return _error_reply(msg, code, reason)


def make_client_app(provider: RuntimeProvider, mods: list[Mod] | None = None) -> ClientApp:
    """A ``ClientApp`` that trains and evaluates with the runtime ``provider`` builds.

    Args:
        provider: Builds the :class:`ClientRuntime` from Flower's ``Context``.
        mods: Optional Flower client mods, applied around every message.

    """
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        mismatch = protocol_mismatch(msg)
        if mismatch is not None:
            return _mismatch_reply(msg, context, mismatch)

        def work() -> Message:
            runtime = provider(context)
            client = client_for(runtime)
            global_model = read_global_record(msg.content.array_records.get(KEY_GLOBAL))
            ledger = load_ledger(context, runtime)
            cfg = client.admit(
                msg.metadata.message_type,
                msg.content.config_records.get(KEY_CONFIG),
                global_model,
                ledger,
            )
            reply = client.train(cfg, global_model, ledger)
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

        return _guarded(msg, context, "train", work)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        mismatch = protocol_mismatch(msg)
        if mismatch is not None:
            return _mismatch_reply(msg, context, mismatch)

        def work() -> Message:
            runtime = provider(context)
            client = client_for(runtime)
            global_model = read_global_record(msg.content.array_records.get(KEY_GLOBAL))
            cfg = client.admit(
                msg.metadata.message_type, msg.content.config_records.get(KEY_CONFIG), global_model
            )
            metrics = client.evaluate(cfg, global_model)
            content = RecordDict(
                {
                    KEY_METRICS: MetricRecord(metrics),
                    KEY_CLIENT: ConfigRecord({"client-id": runtime.client_id}),
                }
            )
            return Message(content, reply_to=msg)

        return _guarded(msg, context, "evaluate", work)

    return app


def _flower_runtime(context: Context) -> ClientRuntime:
    """The runtime of a node in ``flwr run .``'s default job (imported lazily)."""
    from sepals.simulations.flwr_app import client_runtime

    return client_runtime(context)


app = make_client_app(_flower_runtime)
