"""Small file helpers: atomic writes with explicit permissions."""

from __future__ import annotations

import os
from pathlib import Path

from sepals.common.errors import InsecureFileError

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


def atomic_write(path: Path, data: bytes, secret: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half.

    The bytes go to a temporary file in the same directory, are flushed and fsync'ed,
    and the file is renamed over ``path``. Secret files are created with mode 0600 from
    the first byte, so there is no window in which they are world-readable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    mode = SECRET_MODE if secret else PUBLIC_MODE
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def require_private(path: Path, what: str, *, allow_insecure: bool = False) -> None:
    """Refuse a secret file that group or other users may read or write.

    Args:
        path: The file.
        what: What it holds, for the message (``"node key"``, ``"HE secret key"``).
        allow_insecure: Only warn (trials); the caller logs the returned problem.

    Raises:
        InsecureFileError: the mode has group or other bits, naming the ``chmod`` to run.

    """
    mode = path.stat().st_mode
    if mode & 0o077 and not allow_insecure:
        raise InsecureFileError(
            f"{what} {path} is accessible by other users (mode {mode & 0o777:o}); "
            f"run: chmod 600 {path}"
        )
