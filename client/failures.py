"""What a client's failure may tell the server, and how the client logs it.

Every failure becomes an error reply with a code and a short reason: a fixed phrase per
kind of failure, or a reason that sepals composed without quoting any value. The
exception's own text (which may quote paths, values or library internals) stays in the
client's log, and in a simulation also reaches the run's report through a hook.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import Context, Message

from sepals.common.errors import (
    BadSharesError,
    BudgetExhaustedError,
    DeltaTooLargeError,
    ExplanationRejectedError,
    ForeignKeyError,
    GlobalModelRejectedError,
    LedgerLockedError,
    MalformedPayloadError,
    MaskProtocolError,
    ModelCompatibilityError,
    NonFiniteUpdateError,
    SepalsError,
    TrainingInputError,
)
from sepals.common.ledger import LedgerFileError
from sepals.common.log import log
from sepals.common.plan import PlanViolationError
from sepals.common.protocol import (
    BAD_SHARES_REASON,
    ERR_BAD_GLOBAL,
    ERR_BAD_SHARES,
    ERR_BUDGET_EXHAUSTED,
    ERR_CLIENT_FAILURE,
    ERR_MASKING,
    ERR_PLAN_MISMATCH,
)

# What a failure may tell the server: a short fixed phrase per kind of failure. The
# exception's own text (which may quote paths, values or library internals) stays in
# the client's log.
_VETTED: tuple[tuple[type[Exception], int, str], ...] = (
    (MaskProtocolError, ERR_MASKING, "masking refused"),
    (ExplanationRejectedError, ERR_BAD_GLOBAL, "explanation sum rejected: tag or length"),
    (GlobalModelRejectedError, ERR_BAD_GLOBAL, "global model rejected: out of range"),
    (ForeignKeyError, ERR_BAD_GLOBAL, "global model under another key"),
    (MalformedPayloadError, ERR_BAD_GLOBAL, "malformed global model"),
    (NonFiniteUpdateError, ERR_CLIENT_FAILURE, "non-finite update"),
    (LedgerFileError, ERR_CLIENT_FAILURE, "ledger unusable"),
    (LedgerLockedError, ERR_CLIENT_FAILURE, "ledger in use"),
    (DeltaTooLargeError, ERR_CLIENT_FAILURE, "delta not below 1/n for this client's data"),
    (ModelCompatibilityError, ERR_CLIENT_FAILURE, "model cannot be trained with DP-SGD"),
    # Raised by the app's own model, data or loss (sepals' own checks raise the
    # errors above, or TrainingInputError with its reason): the text stays here.
    (ValueError, ERR_CLIENT_FAILURE, "the app's model, data or loss raised ValueError"),
    (TypeError, ERR_CLIENT_FAILURE, "the app's model, data or loss raised TypeError"),
    (RuntimeError, ERR_CLIENT_FAILURE, "the app's model, data or loss raised RuntimeError"),
)


def vetted_reason(exc: BaseException) -> tuple[int, str]:
    """The error code and the short reason a client may send for ``exc``."""
    if isinstance(exc, PlanViolationError):
        return ERR_PLAN_MISMATCH, exc.reason
    if isinstance(exc, BudgetExhaustedError):
        # Built by PrivacyLedger.check_budget from the client's own epsilon figures.
        return ERR_BUDGET_EXHAUSTED, str(exc)
    if isinstance(exc, TrainingInputError):
        return ERR_CLIENT_FAILURE, exc.reason
    if isinstance(exc, BadSharesError):
        return ERR_BAD_SHARES, f"{BAD_SHARES_REASON} {', '.join(map(str, exc.senders))}"
    for kind, code, reason in _VETTED:
        if isinstance(exc, kind):
            return code, reason
    return ERR_CLIENT_FAILURE, "client failure"


# Told of every failure, with the message and the exception, after the client logged it:
# a simulation keeps the full reason for its own report (the run is one party's). A
# deployed client has none: the full reason stays in its own log.
FailureHook = Callable[[Context, Message, str, BaseException], None]


def logged_failure(
    context: Context,
    action: str,
    exc: Exception,
    msg: Message | None = None,
    on_failure: FailureHook | None = None,
) -> tuple[int, str]:
    """Log why ``action`` failed; return the error code and the reason the server may see."""
    code, reason = vetted_reason(exc)
    if on_failure is not None and msg is not None:
        on_failure(context, msg, action, exc)
    where = f"node {context.node_id}"
    if code in (ERR_BUDGET_EXHAUSTED, ERR_PLAN_MISMATCH):
        log(INFO, "%s declines to %s: %s", where, action, exc)
    elif isinstance(exc, SepalsError | ValueError):
        log(WARNING, "%s cannot %s: %s", where, action, exc)
    else:
        log(WARNING, "%s failed to %s: %s", where, action, traceback.format_exc())
    return code, reason
