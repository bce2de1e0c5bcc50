"""The on-disk privacy ledger of one client.

A ledger file is JSON, written atomically (temporary file, fsync, rename), so that a
crash leaves either the previous or the new spend on disk, never a torn file::

    {
      "format": "sepals-ledger/1",
      "client_id": "client-1",
      "updated": "2026-11-25T12:00:00+00:00",
      "ledger": {"epsilon": 3.1, "delta": 1e-05, "target_epsilon": 8.0,
                 "rounds": [1, 2], "history": [[sigma, q, steps], ...],
                 "accountant": "rdp", "noise_multiplier": ..., "sample_rate": ...,
                 "planned_rounds": ...}
    }

The file is private: it is written with mode 0600, and a ledger file that group or
other users may access is refused on reading and on writing (``InsecureFileError``)
unless the caller passes an explicit override for trials. Reading checks the shape of
every known key (types, ranges), so a damaged or hand-edited ledger is a one-line
:class:`LedgerFileError` naming the file and the key, never a crash.

``ledger`` is the client's :class:`~sepals.client.privacy.PrivacyLedger` as a dict: the
(epsilon, delta) spent so far, the accountant's state (its history of
``(noise multiplier, sample rate, steps)``) and the rounds joined. This module owns only
the file format, so that ``sepals ledger show`` can print a ledger without the client
code; the privacy math lives in :mod:`sepals.client.privacy`.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any

from sepals.common.accounting import NEIGHBOURING_RELATION, RELATIONS_DOC
from sepals.common.errors import LedgerLockedError, SepalsError
from sepals.common.files import atomic_write, require_private

LEDGER_FORMAT = "sepals-ledger/1"


class LedgerFileError(SepalsError):
    """A ledger file is missing, unreadable, of another format, or malformed."""


def write_ledger_file(
    path: Path,
    client_id: str,
    ledger: dict[str, Any],
    *,
    allow_insecure_permissions: bool = False,
) -> None:
    """Atomically replace ``path`` with ``ledger`` for ``client_id`` (mode 0600).

    Args:
        path: The ledger file.
        client_id: The client it belongs to.
        ledger: The ledger as a dict (see the module docstring).
        allow_insecure_permissions: Replace an existing ledger file that group or other
            users may access (trials only; a warning is logged).

    Raises:
        InsecureFileError: the existing file has group or other permission bits.
        LedgerFileError: ``ledger`` does not have the shape of a ledger.

    """
    check_ledger(ledger, path)
    if path.exists():
        require_private(path, "privacy ledger", allow_insecure=allow_insecure_permissions)
    doc = {
        "format": LEDGER_FORMAT,
        "client_id": client_id,
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "ledger": ledger,
    }
    atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), secret=True)


def read_ledger_file(path: Path, *, allow_insecure_permissions: bool = False) -> dict[str, Any]:
    """The whole ledger document at ``path``, checked for shape.

    Args:
        path: The ledger file.
        allow_insecure_permissions: Read a file that group or other users may access
            (trials only; a warning is logged).

    Raises:
        LedgerFileError: the file is missing, unreadable, not JSON, not a sepals ledger,
            or a value in it has the wrong type or range (one line naming the key).
        InsecureFileError: the file has group or other permission bits.

    """
    try:
        require_private(path, "privacy ledger", allow_insecure=allow_insecure_permissions)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise LedgerFileError(f"no ledger at {path}") from exc
    except OSError as exc:
        raise LedgerFileError(f"cannot read ledger {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise LedgerFileError(f"cannot read ledger {path}: not UTF-8 text") from exc
    try:
        doc = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        detail = exc if isinstance(exc, ValueError) else "nested too deeply"
        raise LedgerFileError(f"cannot read ledger {path}: not JSON ({detail})") from exc
    if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT:
        raise LedgerFileError(f"{path} is not a {LEDGER_FORMAT} file (wrong or no 'format')")
    for key in ("client_id", "updated"):
        if key in doc and not isinstance(doc[key], str):
            raise LedgerFileError(f"{path}: {key} must be a string, got {_show(doc[key])}")
    if not isinstance(doc.get("ledger"), dict):
        raise LedgerFileError(f"{path} has no 'ledger' object")
    check_ledger(doc["ledger"], path)
    return doc


def _refuse_constant(name: str) -> float:
    """JSON's ``Infinity`` (an epsilon without guarantee) is kept; NaN and -Infinity not."""
    if name == "Infinity":
        return math.inf
    raise ValueError(f"{name} is not a number")


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({type(value).__name__})"


def _is_number(value: object) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_ledger(led: dict[str, Any], path: Path) -> None:
    """Check the shape of a ledger dict: every known key of the right type and range.

    Keys this module does not know are left alone (a newer client may add some).

    Raises:
        LedgerFileError: one line naming ``path`` and the key.

    """

    def bad(key: str, want: str) -> LedgerFileError:
        return LedgerFileError(f"{path}: ledger.{key} must be {want}, got {_show(led.get(key))}")

    for key in ("accountant", "delta", "target_epsilon", "history", "rounds"):
        if key not in led:
            raise LedgerFileError(f"{path}: ledger.{key} is missing")
    if not isinstance(led["accountant"], str):
        raise bad("accountant", "a string")
    if not (_is_number(led["delta"]) and 0.0 < led["delta"] < 1.0):
        raise bad("delta", "a number in (0, 1)")
    target = led["target_epsilon"]
    if target is not None and not (_is_number(target) and target > 0):
        raise bad("target_epsilon", "a finite number > 0 or null")
    sigma = led.get("noise_multiplier")
    if sigma is not None and not (_is_number(sigma) and sigma >= 0):
        raise bad("noise_multiplier", "a finite number >= 0 or null")
    # Infinity is an honest epsilon (no guarantee, e.g. with zero noise); NaN is not.
    for key in ("epsilon", "replace_one_epsilon"):
        eps = led.get(key)
        if eps is not None and not (_is_number(eps) and eps >= 0) and eps != math.inf:
            raise bad(key, "a number >= 0 (or Infinity) or null")
    rate = led.get("sample_rate")
    if rate is not None and not (_is_number(rate) and 0.0 < rate <= 1.0):
        raise bad("sample_rate", "a number in (0, 1] or null")
    planned = led.get("planned_rounds", 0)
    if not (_is_int(planned) and planned >= 0):
        raise bad("planned_rounds", "an integer >= 0")
    history = led["history"]
    if not isinstance(history, list | tuple):
        raise bad("history", "a list of [noise multiplier, sample rate, steps]")
    for i, entry in enumerate(history):
        if not (
            isinstance(entry, list | tuple)
            and len(entry) == 3
            and _is_number(entry[0])
            and entry[0] >= 0
            and _is_number(entry[1])
            and 0.0 <= entry[1] <= 1.0
            and _is_int(entry[2])
            and entry[2] >= 0
        ):
            raise LedgerFileError(
                f"{path}: ledger.history[{i}] must be [noise multiplier >= 0, sample rate "
                f"in [0, 1], steps: an integer >= 0], got {_show(entry)}"
            )
    rounds = led["rounds"]
    if not (isinstance(rounds, list | tuple) and all(_is_int(r) and r >= 1 for r in rounds)):
        raise bad("rounds", "a list of round numbers (integers >= 1)")


def format_ledger(doc: dict[str, Any]) -> str:
    """A human-readable summary of a ledger document."""
    led = doc["ledger"]
    eps, target = led.get("epsilon"), led.get("target_epsilon")
    steps = sum(int(entry[2]) for entry in led.get("history", []))
    rounds = led.get("rounds", [])
    lines = [
        f"client           {doc.get('client_id', '?')}",
        f"updated          {doc.get('updated', '?')}",
    ]
    if target is None:
        lines.append("privacy          off (no DP budget; rounds are not private)")
    else:
        spent = float(eps or 0.0)
        replace_one = led.get("replace_one_epsilon")
        lines += [
            f"epsilon spent    {spent:.4f} of {float(target):g} "
            f"({100.0 * spent / float(target):.1f}%) at delta {float(led['delta']):g}, "
            f"{NEIGHBOURING_RELATION} neighbours (enforced)",
            "replace-one      "
            + ("n/a" if replace_one is None else f"{float(replace_one):.4f}")
            + f" (the same accountant; see {RELATIONS_DOC})",
            f"accountant       {led.get('accountant')}",
            f"noise multiplier {led.get('noise_multiplier')}",
            f"sample rate      {led.get('sample_rate')}",
            f"DP-SGD steps     {steps}",
        ]
    lines.append(f"rounds joined    {len(rounds)}: {', '.join(str(r) for r in rounds) or '-'}")
    return "\n".join(lines)


class LedgerLock:
    """An exclusive lock on one ledger, held by one client process from read to write.

    The lock is ``flock`` on a sidecar file ``<ledger>.lock`` (mode 0600), taken without
    waiting: a second process that opens the same ledger is refused at once, so two
    clients can never compose their spends into one file. The kernel releases the lock
    when the process dies, so a crash never leaves a stale lock behind.
    """

    def __init__(self, ledger_path: Path) -> None:
        self.path = ledger_path.with_name(ledger_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            LedgerLockedError: another process holds it.

        """
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise LedgerLockedError(
                f"ledger {self.path.with_suffix('')} is in use by another process; "
                "each client needs its own ledger"
            ) from exc
        self._fd = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> LedgerLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()
