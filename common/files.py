"""Small file helpers: atomic writes, secret-file checks, whether git would see a file."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
from logging import WARNING
from pathlib import Path
from typing import Any

from sepals.common.errors import InsecureFileError
from sepals.common.log import log

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
PRIVATE_DIR_MODE = 0o700

# Flags of a temporary file: a new file only (never an existing one, nor whatever a
# symlink planted at its name points to), and not inherited by child processes.
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: bytes, secret: bool = False, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half.

    The bytes go to a new temporary file in the same directory, named
    ``.<name>.<32 random hex digits>.tmp`` so that nobody can predict it, and created
    with ``O_EXCL | O_NOFOLLOW``: a file or symlink planted at that name makes the write
    fail instead of redirecting it. The file is created with its final mode (0600 for
    secrets, so there is no window in which it is readable by others), fsync'ed, renamed
    over ``path`` (a symlink at ``path`` is replaced, never followed), and the directory
    is fsync'ed so that the rename survives a crash. On any failure the temporary file
    is removed; ``path`` keeps its old content.

    Args:
        path: The destination.
        data: The new content.
        secret: Mode 0600 instead of 0644.
        durable: Fsync the file and the directory. ``False`` keeps the atomicity but
            not the durability across a crash (for notes that are cheap to lose).

    Raises:
        FileExistsError: something already exists at the temporary name (an attack:
            the name has 128 random bits).
        OSError: the directory cannot be written.

    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(16)}.tmp")
    mode = SECRET_MODE if secret else PUBLIC_MODE
    fd = os.open(tmp, _TMP_FLAGS, mode)  # raises before anything is ours to clean up
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # exact mode, whatever the umask
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def insecure_mode_problem(path: Path, what: str, *, directory: bool = False) -> str | None:
    """Why ``path`` is not private, or ``None`` when no group or other bit is set.

    Args:
        path: A file or directory (symlinks are followed).
        what: What it holds, for the message.
        directory: ``path`` is a directory; the fix to name is ``chmod 700``.

    Raises:
        OSError: ``path`` cannot be examined (for example it does not exist).

    """
    mode = path.stat().st_mode & 0o777
    if not mode & 0o077:
        return None
    fix = "700" if directory else "600"
    return f"{what} {path} is accessible by other users (mode {mode:o}); run: chmod {fix} {path}"


def require_private(path: Path, what: str, *, allow_insecure: bool = False) -> str | None:
    """Refuse a secret file that group or other users may read or write.

    Args:
        path: The file.
        what: What it holds, for the message (``"node key"``, ``"HE secret key"``).
        allow_insecure: Only warn (trials): the problem is logged as a warning and
            returned instead of raised.

    Returns:
        The problem when ``allow_insecure`` let it pass, else ``None``.

    Raises:
        InsecureFileError: the mode has group or other bits, naming the ``chmod`` to run.
        OSError: ``path`` cannot be examined (for example it does not exist).

    """
    problem = insecure_mode_problem(path, what)
    if problem is None:
        return None
    if not allow_insecure:
        raise InsecureFileError(problem)
    log(WARNING, "%s (allowed by the insecure-permissions override)", problem)
    return problem


def check_usable_dir(path: Path, what: str) -> None:
    """Check, without creating anything, that ``path`` is or can become a writable directory.

    Args:
        path: The directory.
        what: What it is, for the message (``"[server] state_dir"``).

    Raises:
        ValueError: ``path`` (or an ancestor) is not a directory, or the directory that
            exists, or its nearest existing ancestor, cannot be written; one line naming
            the path.

    """
    if "\0" in str(path):
        raise ValueError(f"{what} {path!r} contains a NUL byte")
    probe = path
    try:
        while not probe.exists():
            if probe.is_symlink():
                raise ValueError(f"{what} {path}: {probe} is a dangling symlink")
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir():
            where = "" if probe == path else f" ({probe} is not a directory)"
            raise ValueError(f"{what} {path} is not a directory{where}")
        if not os.access(probe, os.W_OK | os.X_OK):
            verb = "is" if probe == path else f"cannot be created in {probe}: it is"
            raise ValueError(f"{what} {path} {verb} not writable by this user")
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be used: {exc.strerror or exc}") from exc


def make_private_dir(path: Path, what: str) -> None:
    """Create ``path`` with mode 0700, or tighten an existing directory to 0700.

    An existing directory with group or other bits is made private (``chmod 700``) with
    a warning: it belongs to sepals, and whatever it holds is for its owner only.

    Raises:
        ValueError: ``path`` cannot be used as a directory, or cannot be made private
            (for example it belongs to another user); one line naming the path.

    """
    check_usable_dir(path, what)
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        problem = insecure_mode_problem(path, what, directory=True)
        if problem is not None:
            os.chmod(path, PRIVATE_DIR_MODE)
            log(WARNING, "%s; made it private (chmod 700)", problem.split("; run:")[0])
    except OSError as exc:
        raise ValueError(
            f"{what} {path} cannot be created or made private ({exc.strerror or exc}); "
            f"run: mkdir -p {path} && chmod 700 {path}"
        ) from exc


_CHUNK = 1 << 20


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 (64 hex digits) of a checkpoint file, or of a checkpoint directory.

    A directory's digest covers every regular file below it: its path relative to the
    directory and its bytes, in sorted order, so renaming, adding or changing any
    file changes it.

    Raises:
        ValueError: ``path`` does not exist or holds no file.

    """
    root = Path(path).expanduser()
    if root.is_file():
        return _file_digest(root, hashlib.sha256()).hexdigest()
    if not root.is_dir():
        raise ValueError(f"pretrained checkpoint {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"pretrained checkpoint directory {root} holds no file")
    digest = hashlib.sha256(b"sepals-checkpoint-dir/1\n")
    for file in files:
        rel = file.relative_to(root).as_posix().encode()
        digest.update(len(rel).to_bytes(8, "little") + rel)
        digest.update(file.stat().st_size.to_bytes(8, "little"))
        _file_digest(file, digest)
    return digest.hexdigest()


def _file_digest(path: Path, digest: Any) -> Any:
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest


def git_work_tree(path: Path) -> Path | None:
    """The root of the git work tree that holds ``path`` (``None``: none does).

    ``path`` need not exist yet; its nearest existing ancestor is looked at. A ``.git``
    directory, or a ``.git`` file (a linked work tree or a submodule), marks a root.
    """
    here = Path(path).expanduser().absolute()
    for folder in (here, *here.parents):
        if (folder / ".git").exists():
            return folder
    return None


def git_ignores(path: Path, root: Path) -> bool | None:
    """Whether git ignores ``path`` in the work tree at ``root`` (``None``: cannot tell)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "check-ignore", "-q", "--no-index", str(path)],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {0: True, 1: False}.get(done.returncode)
