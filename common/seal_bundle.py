"""BFV key bundles and SEAL objects as bytes (``tenseal.sealapi``).

A *key bundle* (``SPLK`` magic) holds the SEAL encryption parameters, the public key
and, for clients only, the secret key. The server receives a bundle without the secret
key (it needs no key at all to add; the public key only names the key). The fingerprint
is the first 16 bytes of SHA-256 over parameters and public key.

``tenseal.sealapi`` saves and loads objects through file paths only, so this module
moves bytes through one anonymous in-memory file per thread (Linux ``memfd_create``,
opened as ``/proc/self/fd/N``: no directory entry, gone with the process; a private
0700 temporary directory elsewhere). Only ciphertexts and key material pass through it;
plaintext updates never do. After a secret key passes, the file is overwritten with
zeros and emptied.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
import tempfile
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sepals.common.codec import FINGERPRINT_BYTES
from sepals.common.config import EncryptionConfig
from sepals.common.errors import MalformedPayloadError

BUNDLE_MAGIC = b"SPLK"


_BUNDLE_HEAD = struct.Struct("<4sBB")  # magic, version, has secret key


_BUNDLE_VERSION = 1


def is_bfv_bundle(data: bytes) -> bool:
    """Whether ``data`` is a sepals BFV key bundle (rather than a TenSEAL context)."""
    return data[:4] == BUNDLE_MAGIC


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class SealFiles:
    """Bytes <-> sealapi objects, which ``tenseal.sealapi`` only saves and loads by path.

    On Linux each thread gets an anonymous in-memory file (``memfd_create``), reached as
    ``/proc/self/fd/N``: nothing appears in any directory, and nothing outlives the
    process. Elsewhere a private temporary directory (mode 0700) serves, removed when
    this object is collected or the interpreter exits.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self._dir: str | None = None
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            weakref.finalize(self, _close_all, self._fds)
        else:
            self._dir = tempfile.mkdtemp(prefix="sepals-seal-")
            weakref.finalize(self, shutil.rmtree, self._dir, True)

    def _scratch(self) -> tuple[str, int | None]:
        """Return the calling thread's scratch path (and its memfd, if any)."""
        scratch: tuple[str, int | None] | None = getattr(self._local, "scratch", None)
        if scratch is None:
            if self._dir is None:
                fd = os.memfd_create("sepals-seal", os.MFD_CLOEXEC)
                with self._lock:
                    self._fds.append(fd)
                scratch = (f"/proc/self/fd/{fd}", fd)
            else:
                path = os.path.join(self._dir, f"scratch-{threading.get_ident()}")
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
                scratch = (path, None)
            self._local.scratch = scratch
        return scratch

    def dump(self, obj: Any, *, secret: bool = False) -> bytes:
        """Serialize a sealapi object (or Serializable) that has ``save(path)``.

        With ``secret`` the scratch file is emptied right after reading.
        """
        path, fd = self._scratch()
        obj.save(path)
        try:
            if fd is None:
                return Path(path).read_bytes()
            return os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            if secret:
                self._clear(path, fd)

    def load(self, data: bytes, loader: Any, *, secret: bool = False) -> None:
        """Call ``loader(path)`` on the scratch file holding ``data``.

        With ``secret`` the scratch file is emptied right after loading.
        """
        path, fd = self._scratch()
        try:
            if fd is None:
                Path(path).write_bytes(data)
            else:
                os.ftruncate(fd, len(data))
                os.pwrite(fd, data, 0)
            loader(path)
        finally:
            if secret:
                self._clear(path, fd)

    @staticmethod
    def _clear(path: str, fd: int | None) -> None:
        if fd is not None:
            os.pwrite(fd, bytes(os.fstat(fd).st_size), 0)
            os.ftruncate(fd, 0)
            return
        with open(path, "r+b") as fh:
            fh.write(bytes(fh.seek(0, os.SEEK_END)))
            fh.truncate(0)


def pack_bundle(params: bytes, public_key: bytes, secret_key: bytes | None) -> bytes:
    """Bundle bytes: head, then parameters, public key and the secret key if given."""
    parts = [params, public_key] + ([secret_key] if secret_key is not None else [])
    head = _BUNDLE_HEAD.pack(BUNDLE_MAGIC, _BUNDLE_VERSION, int(secret_key is not None))
    return head + b"".join(struct.pack("<I", len(p)) + p for p in parts)


def unpack_bundle(data: bytes) -> tuple[bytes, bytes, bytes | None]:
    """``(parameters, public key, secret key or None)`` of a bundle.

    Raises:
        MalformedPayloadError: the bytes are not a well-formed bundle.

    """
    if len(data) < _BUNDLE_HEAD.size:
        raise MalformedPayloadError("BFV key bundle is truncated")
    magic, version, has_secret = _BUNDLE_HEAD.unpack_from(data)
    if magic != BUNDLE_MAGIC or version != _BUNDLE_VERSION or has_secret not in (0, 1):
        raise MalformedPayloadError("not a sepals BFV key bundle (bad magic or version)")
    parts: list[bytes] = []
    offset = _BUNDLE_HEAD.size
    for _ in range(2 + has_secret):
        if offset + 4 > len(data):
            raise MalformedPayloadError("BFV key bundle is truncated")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise MalformedPayloadError("BFV key bundle is truncated")
        parts.append(data[offset : offset + size])
        offset += size
    if offset != len(data):
        raise MalformedPayloadError("BFV key bundle has trailing bytes")
    return parts[0], parts[1], parts[2] if has_secret else None


def seal_params(config: EncryptionConfig) -> Any:
    """SEAL ``EncryptionParameters`` of a BFV config (ring, primes, batching modulus t)."""
    import tenseal.sealapi as seal

    n = config.poly_modulus_degree
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
    parms.set_poly_modulus_degree(n)
    coeff = seal.CoeffModulus.Create(n, list(config.coeff_mod_bit_sizes))
    parms.set_coeff_modulus(coeff)
    parms.set_plain_modulus(_batching_plain_modulus(n, config.plain_modulus_bits, coeff))
    return parms


def _batching_plain_modulus(n: int, bits: int, coeff_modulus: Sequence[Any]) -> Any:
    """The largest ``bits``-bit batching prime (``t = 1 mod 2n``) not in ``coeff_modulus``.

    SEAL draws coefficient primes and batching primes from the same list (the largest
    primes ``= 1 mod 2n`` below ``2^bits``), so ``PlainModulus.Batching(n, b)`` returns
    the very prime ``CoeffModulus.Create`` chose for a ``b``-bit coefficient prime, and
    SEAL then refuses the parameters (``plain_modulus is not coprime to
    coeff_modulus``). Asking for one more ``bits``-bit prime than the coefficient
    modulus holds and keeping the largest unused one avoids that; without a collision
    this is the same prime as ``PlainModulus.Batching(n, bits)``. Distinct primes are
    coprime, so t is coprime to every coefficient prime. Deterministic: the clients, the
    server and the provisioner all derive the same t.
    """
    import tenseal.sealapi as seal

    taken = {int(m.value()) for m in coeff_modulus}
    candidates = seal.PlainModulus.Batching(n, [bits] * (len(taken) + 1))
    free = [m for m in candidates if int(m.value()) not in taken]
    return max(free, key=lambda m: int(m.value()))


def seal_context(parms: Any) -> Any:
    """A ``SEALContext`` for ``parms`` at 128-bit security, refusing invalid parameters."""
    import tenseal.sealapi as seal

    ctx = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise MalformedPayloadError(
            f"BFV parameters rejected by SEAL: {ctx.parameters_error_message()}"
        )
    return ctx


def generate_bfv_bundle(config: EncryptionConfig) -> bytes:
    """Fresh BFV keys for ``config``: the clients' bundle (it holds the secret key)."""
    import tenseal.sealapi as seal

    if config.scheme != "bfv":
        raise ValueError(f"cannot generate BFV keys for scheme {config.scheme!r}")
    files = SealFiles()
    parms = seal_params(config)
    ctx = seal_context(parms)
    keygen = seal.KeyGenerator(ctx)
    public_key = seal.PublicKey()
    keygen.create_public_key(public_key)
    params_b, public_b = files.dump(parms), files.dump(public_key)
    secret_b = files.dump(keygen.secret_key(), secret=True)
    return pack_bundle(params_b, public_b, secret_b)


def public_bfv_bundle(bundle: bytes) -> bytes:
    """The server's bundle: the same parameters and public key, no secret key."""
    params, public_key, _ = unpack_bundle(bundle)
    return pack_bundle(params, public_key, None)


def bfv_fingerprint(bundle: bytes) -> bytes:
    """16-byte key fingerprint of a bundle (the same with or without the secret key)."""
    params, public_key, _ = unpack_bundle(bundle)
    digest = hashlib.sha256(b"sepals/bfv\x00" + params + b"\x00" + public_key).digest()
    return digest[:FINGERPRINT_BYTES]


@dataclass(frozen=True)
class KeyParameters:
    """The HE parameters that a key bundle or a TenSEAL context was made with.

    Attributes:
        scheme: ``bfv`` or ``ckks``.
        poly_modulus_degree: Ring dimension N.
        coeff_mod_bit_sizes: Bit sizes of the coefficient-modulus primes, special last.
        plain_modulus_bits: Bit size of the plaintext modulus t (BFV only).

    """

    scheme: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    plain_modulus_bits: int | None


def key_parameters(data: bytes) -> KeyParameters:
    """The HE parameters of serialized key material (BFV bundle or TenSEAL CKKS context).

    Only the parameters are read; no key is loaded from a BFV bundle.

    Raises:
        MalformedPayloadError: the bytes are neither.

    """
    import tenseal.sealapi as seal

    files = SealFiles()
    if is_bfv_bundle(data):
        params_b, _, _ = unpack_bundle(data)
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
        try:
            files.load(params_b, parms.load)
        except Exception as exc:
            raise MalformedPayloadError(f"BFV parameters do not load: {exc}") from exc
    else:
        import tenseal as ts

        try:
            context = ts.context_from(data)
            raw = files.dump(context.seal_context().data.key_context_data().parms())
            parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
            files.load(raw, parms.load)
        except Exception as exc:
            raise MalformedPayloadError(
                f"not a BFV key bundle nor a TenSEAL context: {exc}"
            ) from exc
    scheme = {seal.SCHEME_TYPE.BFV: "bfv", seal.SCHEME_TYPE.CKKS: "ckks"}.get(parms.scheme(), "?")
    return KeyParameters(
        scheme=scheme,
        poly_modulus_degree=int(parms.poly_modulus_degree()),
        coeff_mod_bit_sizes=tuple(int(m.bit_count()) for m in parms.coeff_modulus()),
        plain_modulus_bits=int(parms.plain_modulus().bit_count()) if scheme == "bfv" else None,
    )
