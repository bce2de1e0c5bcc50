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
import os
from pathlib import Path
from typing import Any

from sepals.common.errors import LedgerLockedError, SepalsError
from sepals.common.files import atomic_write

LEDGER_FORMAT = "sepals-ledger/1"


class LedgerFileError(SepalsError):
    """A ledger file is missing, unreadable, or of another format."""


def write_ledger_file(path: Path, client_id: str, ledger: dict[str, Any]) -> None:
    """Atomically replace ``path`` with ``ledger`` for ``client_id``."""
    doc = {
        "format": LEDGER_FORMAT,
        "client_id": client_id,
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "ledger": ledger,
    }
    atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), secret=True)


def read_ledger_file(path: Path) -> dict[str, Any]:
    """The whole ledger document at ``path``.

    Raises:
        LedgerFileError: the file is missing, not JSON, or not a sepals ledger.

    """
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise LedgerFileError(f"no ledger at {path}") from exc
    except (OSError, ValueError) as exc:
        raise LedgerFileError(f"cannot read ledger {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != LEDGER_FORMAT:
        raise LedgerFileError(f"{path} is not a {LEDGER_FORMAT} file")
    if not isinstance(doc.get("ledger"), dict):
        raise LedgerFileError(f"{path} has no 'ledger' object")
    return doc


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
        lines += [
            f"epsilon spent    {spent:.4f} of {float(target):g} "
            f"({100.0 * spent / float(target):.1f}%) at delta {float(led['delta']):g}",
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
