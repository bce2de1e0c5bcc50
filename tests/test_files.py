"""Atomic writes, secret-file permissions, private directories and the ledger lock."""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sepals.common import files
from sepals.common.errors import InsecureFileError, LedgerLockedError
from sepals.common.files import (
    atomic_write,
    check_usable_dir,
    make_private_dir,
    require_private,
)
from sepals.common.ledger import LedgerLock

FIXED_TOKEN = "ab" * 16


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Permissions must come from the code, not from a friendly umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------- atomic_write: symlinks
def test_a_symlink_at_the_old_predictable_temp_name_redirects_nothing(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "secret.key"
    # Earlier versions wrote to ".<name>.<pid>.tmp": an attacker could plant that.
    (tmp_path / f".secret.key.{os.getpid()}.tmp").symlink_to(victim)
    atomic_write(target, b"KEY", secret=True)
    assert victim.read_bytes() == b"precious"
    assert target.read_bytes() == b"KEY" and not target.is_symlink()
    assert _mode(target) == 0o600


def test_a_symlink_planted_at_the_temp_location_makes_the_write_fail_not_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "secret.key"
    target.write_bytes(b"old")
    # Suppose the attacker guessed the random name (or won the race to create it).
    monkeypatch.setattr(files.secrets, "token_hex", lambda _n: FIXED_TOKEN)
    planted = tmp_path / f".secret.key.{FIXED_TOKEN}.tmp"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"KEY", secret=True)
    assert victim.read_bytes() == b"precious", "the write was redirected"
    assert target.read_bytes() == b"old"
    assert planted.is_symlink(), "a file the writer did not create is not its to remove"


def test_a_dangling_symlink_at_the_temp_location_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "secret.key"
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setattr(files.secrets, "token_hex", lambda _n: FIXED_TOKEN)
    (tmp_path / f".secret.key.{FIXED_TOKEN}.tmp").symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"KEY", secret=True)
    assert not elsewhere.exists(), "O_CREAT followed a dangling symlink"
    assert not target.exists()


def test_a_symlink_at_the_destination_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "ledger.json"
    target.symlink_to(victim)
    atomic_write(target, b"{}", secret=True)
    assert victim.read_bytes() == b"precious"
    assert not target.is_symlink() and target.read_bytes() == b"{}"


def test_temp_names_are_unpredictable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names: list[str] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        names.append(os.path.basename(path))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(files.os, "open", spy)
    for _ in range(3):
        atomic_write(tmp_path / "f", b"x")
    temps = [n for n in names if n.endswith(".tmp")]
    assert len(temps) == 3 and len(set(temps)) == 3
    assert all(str(os.getpid()) not in n for n in temps)
    assert all(len(n.split(".")[-2]) >= 32 for n in temps), "at least 128 random bits"


# ---------------------------------------------------------------- atomic_write: modes
@pytest.mark.usefixtures("umask_zero")
@pytest.mark.parametrize(("secret", "mode"), [(True, 0o600), (False, 0o644)])
def test_the_file_has_its_final_mode_from_creation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret: bool, mode: int
) -> None:
    seen: list[tuple[int, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode_arg: int = 0o777, **kw: Any) -> int:
        fd = real_open(path, flags, mode_arg, **kw)
        if str(path).endswith(".tmp"):
            # Before a single byte is written: what mode does the new file have?
            seen.append((flags, stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    monkeypatch.setattr(files.os, "open", spy)
    target = tmp_path / "f"
    atomic_write(target, b"data", secret=secret)
    assert len(seen) == 1
    flags, created = seen[0]
    assert created == mode
    for flag in (os.O_CREAT, os.O_EXCL, os.O_NOFOLLOW, os.O_CLOEXEC):
        assert flags & flag
    assert _mode(target) == mode


def test_a_strict_umask_does_not_hide_a_public_file(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "ca.pem", b"cert")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "ca.pem") == 0o644


def test_a_failed_write_removes_its_temp_file_and_keeps_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def broken_fsync(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new", secret=True)
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_a_failed_rename_removes_its_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"

    def broken_replace(_a: Any, _b: Any) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="cross-device"):
        atomic_write(target, b"new")
    assert not target.exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------- atomic_write: races
def test_concurrent_writers_never_clobber_each_others_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.json"
    writers, rounds = 8, 40
    payloads = {i: bytes([65 + i]) * (4096 + i) for i in range(writers)}
    errors: list[BaseException] = []
    start = threading.Barrier(writers)

    def writer(i: int) -> None:
        start.wait()
        try:
            for _ in range(rounds):
                atomic_write(target, payloads[i], secret=True)
        except BaseException as exc:  # collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], errors[:3]
    assert target.read_bytes() in payloads.values(), "a torn or mixed file"
    assert _mode(target) == 0o600
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- require_private
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o666, 0o700 | 0o020])
def test_a_secret_file_with_group_or_other_bits_is_refused(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "node.key"
    key.write_bytes(b"k")
    key.chmod(mode)
    with pytest.raises(InsecureFileError, match=f"run: chmod 600 {key}") as info:
        require_private(key, "node key")
    assert "node key" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_a_private_secret_file_passes(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "node.key"
    key.write_bytes(b"k")
    key.chmod(mode)
    assert require_private(key, "node key") is None


def test_the_override_warns_and_returns_the_problem(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "node.key"
    key.write_bytes(b"k")
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="sepals"):
        problem = require_private(key, "node key", allow_insecure=True)
    assert problem is not None and "chmod 600" in problem
    assert any("chmod 600" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- private directories
def test_a_new_private_dir_is_0700(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        make_private_dir(tmp_path / "a" / "state", "[server] state_dir")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a" / "state") == 0o700


def test_an_open_existing_dir_is_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="sepals"):
        make_private_dir(state, "[server] state_dir")
    assert _mode(state) == 0o700
    assert any("mode 755" in r.getMessage() for r in caplog.records)


def test_a_file_in_place_of_a_dir_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("oops")
    with pytest.raises(ValueError, match=f"state_dir {state} is not a directory"):
        make_private_dir(state, "[server] state_dir")
    below = state / "inner"
    with pytest.raises(ValueError, match=f"{below} is not a directory .{state} is not"):
        check_usable_dir(below, "[server] state_dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_dir_is_a_one_line_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="not writable"):
        check_usable_dir(locked / "state", "[server] state_dir")
    with pytest.raises(ValueError, match="not writable"):
        make_private_dir(locked, "[server] state_dir")


def test_checking_a_dir_creates_nothing(tmp_path: Path) -> None:
    check_usable_dir(tmp_path / "a" / "b", "[server] state_dir")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- ledger lock
def test_a_second_holder_of_a_ledger_is_refused(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    with LedgerLock(ledger) as first:
        assert _mode(first.path) == 0o600
        with pytest.raises(LedgerLockedError, match="in use by another process"):
            LedgerLock(ledger).acquire()
    with LedgerLock(ledger):
        pass  # released on exit: the next holder gets it
