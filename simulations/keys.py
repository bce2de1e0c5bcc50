"""HE keys of a simulation: made where the secret may live, and only there.

The evaluator subprocess creates the keys, writes the clients' secret context to a
mode-0600 file and returns only the public context; the clients read the file. The
server's process never holds the secret.
"""

from __future__ import annotations

import functools
from pathlib import Path

from sepals.common.config import EncryptionConfig
from sepals.common.files import atomic_write
from sepals.common.scheme import generate_secret_context


def write_secret_context(encryption: EncryptionConfig, secret_path: str) -> bytes:
    """Key holder (in a subprocess): create the secret context, write it (0600), return it."""
    secret = generate_secret_context(encryption)
    atomic_write(Path(secret_path), secret, secret=True)
    return secret


@functools.lru_cache(maxsize=4)
def read_secret(path: str) -> bytes:
    """The clients' key bundle, read once per worker process (one bytes object)."""
    return Path(path).read_bytes()
