"""Sepals' compact codec: quantized, packed, seeded BFV ciphertexts (``tenseal.sealapi``).

Route, for a flat vector ``x`` (a client's weighted update ``n * w``):

1. **Quantize** every value onto the shared grid ``quant_step`` (derived from the
   config's ``update_bound`` and ``max_clients``) with *stochastic rounding*:
   ``q = floor(x / step + u)``, ``u ~ U[0, 1)`` from an explicit numpy generator
   (seeded from ``os.urandom`` unless the caller passes one). The rounding is unbiased
   and its error is below one step per value; the client measures it and reports the
   maximum (a rounding error, not a statistic of the update).
2. **Pack** two integers per BFV slot, ``v = lo + hi * 2**F`` (F = ``field_bits``),
   and batch-encode ``N`` slots per plaintext, so one ciphertext carries ``2N`` values.
3. **Encrypt** with the secret key as a *seeded* symmetric ciphertext: SEAL stores the
   uniformly random half of the ciphertext as a 64-byte PRNG seed, so an upload is
   ``N`` coefficients of the 60-bit data prime for ``2N`` values: ~4 bytes per value,
   the size of fp32. It is sent in the one encoding the server accepts, uncompressed
   (:mod:`sepals.common.seal_canon`).

The server accepts an upload only in that encoding, loads each ciphertext (SEAL expands
the seed and checks that the data is valid for the parameters), checks parms id, size
and form, keys it by its seed and by its c0 (a ciphertext whose seed or c0 was accepted
before is a replay, see :meth:`BfvCodec._admit_chunks`), and adds. BFV addition is
exact modulo t, and the configuration guarantees the sum never wraps and its noise
never reaches the decryption threshold (see :class:`~sepals.common.config.EncryptionConfig`),
so the decoded sum equals the sum of the clients' quantized integers *exactly*. The
aggregate is an ordinary (unseeded) ciphertext: ~8 bytes per value.

Keys and SEAL objects travel as bytes through :mod:`sepals.common.seal_bundle`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from sepals.common.codec import (
    CheckedUpload,
    FloatVector,
    PayloadHeader,
    UpdateCodec,
    as_finite_vector,
    pack_payload,
    replay_key,
    unpack_payload,
)
from sepals.common.config import EncryptionConfig
from sepals.common.errors import (
    GlobalModelRejectedError,
    MalformedPayloadError,
    MissingSecretKeyError,
    SecretKeyExposureError,
)
from sepals.common.seal_bundle import (
    SealFiles,
    bfv_fingerprint,
    seal_context,
    seal_params,
    unpack_bundle,
)
from sepals.common.seal_canon import SEAL_HEADER, SEAL_MAGIC, SeededLayout

CODEC_BFV = 3
# Serialized ciphertext bytes per coefficient word, with room for SEAL's headers.
_SEAL_OVERHEAD = 4096


class BfvCodec(UpdateCodec):
    """Quantized, packed, seeded BFV ciphertexts; see the module docstring.

    Build a server-side instance with :meth:`for_server` (a bundle with a secret key is
    refused) and a client-side one with :meth:`for_client`.
    """

    codec_id = CODEC_BFV
    name = "bfv-q2"
    _config: EncryptionConfig

    def __init__(self, bundle: bytes, config: EncryptionConfig, *, need_secret: bool) -> None:
        import tenseal.sealapi as seal

        if config.scheme != "bfv":
            raise ValueError(f"BfvCodec needs scheme 'bfv', got {config.scheme!r}")
        params_b, public_b, secret_b = unpack_bundle(bundle)
        if need_secret and secret_b is None:
            raise MissingSecretKeyError("a client needs the secret BFV key bundle")
        if not need_secret and secret_b is not None:
            raise SecretKeyExposureError(
                "refusing a BFV key bundle that holds a secret key: the server must only "
                "ever receive the public bundle (see `public_context_bytes`)"
            )
        self._config = config
        self._files = SealFiles()
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
        try:
            self._files.load(params_b, parms.load)
        except Exception as exc:
            raise MalformedPayloadError(f"BFV parameters do not load: {exc}") from exc
        expected = seal_params(config)
        if parms != expected:
            raise MalformedPayloadError(
                "the key bundle's BFV parameters differ from the configured ones "
                f"(N={config.poly_modulus_degree}, primes {config.coeff_mod_bit_sizes}, "
                f"t of {config.plain_modulus_bits} bits)"
            )
        self._ctx = seal_context(parms)
        public = seal.PublicKey()
        try:
            self._files.load(public_b, lambda p: public.load(self._ctx, p))
        except Exception as exc:
            raise MalformedPayloadError(f"BFV public key does not load: {exc}") from exc
        self._parms_id = self._ctx.first_parms_id()
        data = self._ctx.first_context_data().parms()
        self._q = [m.value() for m in data.coeff_modulus()]
        self._t = int(parms.plain_modulus().value())
        self._fingerprint = bfv_fingerprint(bundle)
        self._evaluator = seal.Evaluator(self._ctx)
        self._encoder = seal.BatchEncoder(self._ctx)
        self._encryptor: Any = None
        self._decryptor: Any = None
        if secret_b is not None:
            secret = seal.SecretKey()
            try:
                self._files.load(secret_b, lambda p: secret.load(self._ctx, p), secret=True)
            except Exception as exc:
                raise MalformedPayloadError(f"BFV secret key does not load: {exc}") from exc
            self._encryptor = seal.Encryptor(self._ctx, secret)
            self._decryptor = seal.Decryptor(self._ctx, secret)
        n = config.poly_modulus_degree
        # Largest serialized ciphertext we accept: two full polynomials plus headers.
        self._max_chunk = 2 * n * len(self._q) * 8 + _SEAL_OVERHEAD
        version = seal.Serialization.SEALHeader()
        self._layout = SeededLayout(
            tuple(int(word) for word in self._parms_id),
            n,
            len(self._q),
            (int(version.version_major), int(version.version_minor)),
        )

    @classmethod
    def for_server(cls, public_bundle: bytes, config: EncryptionConfig) -> BfvCodec:
        """Load the public bundle for aggregation.

        Raises:
            SecretKeyExposureError: the bundle contains a secret key.
            MalformedPayloadError: the bytes are not a BFV key bundle for ``config``.

        """
        return cls(public_bundle, config, need_secret=False)

    @classmethod
    def for_client(cls, secret_bundle: bytes, config: EncryptionConfig) -> BfvCodec:
        """Load the clients' secret bundle.

        Raises:
            MissingSecretKeyError: the bundle has no secret key.

        """
        return cls(secret_bundle, config, need_secret=True)

    @property
    def fingerprint(self) -> bytes:
        """Fingerprint of this codec's key."""
        return self._fingerprint

    @property
    def can_decrypt(self) -> bool:
        """Whether this instance holds the secret key."""
        return self._decryptor is not None

    @property
    def plain_modulus(self) -> int:
        """The BFV plaintext modulus t (a batching prime)."""
        return self._t

    @property
    def slots_per_ciphertext(self) -> int:
        """Plaintext slots of one ciphertext: the ring degree N (two values per slot)."""
        return self._config.poly_modulus_degree

    @property
    def data_modulus(self) -> list[int]:
        """The data primes of every ciphertext that is sent."""
        return list(self._q)

    # ------------------------------------------------------------------ quantization
    def quantize(
        self, vector: FloatVector, rng: np.random.Generator | None = None
    ) -> tuple[npt.NDArray[np.int64], float]:
        """Stochastically round ``vector`` onto the shared grid.

        Returns:
            The integers and the largest absolute rounding error (below one step).

        Raises:
            NonFiniteUpdateError: the vector holds NaN or infinity.
            ValueError: a value exceeds ``update_bound``.

        """
        arr = as_finite_vector(vector)
        bound = self._config.update_bound
        if arr.size and float(np.max(np.abs(arr))) > bound:
            raise ValueError(
                f"update magnitude exceeds update_bound={bound:g}, the per-client bound that "
                f"keeps a sum of max_clients={self._config.max_clients} quantized updates "
                "inside the BFV field; raise update_bound (coarser grid) or lower max_clients"
            )
        gen = rng if rng is not None else np.random.default_rng()
        step = self._config.quant_step
        scaled = arr / step
        q = np.floor(scaled + gen.random(arr.size)).astype(np.int64)
        error = float(np.max(np.abs(arr - q * step))) if arr.size else 0.0
        return q, error

    def _pack(self, q: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
        n = self._config.poly_modulus_degree
        per_ct = 2 * n
        padded = np.zeros(-(-q.size // per_ct) * per_ct, dtype=np.int64)
        padded[: q.size] = q
        rows = padded.reshape(-1, 2, n)
        packed = rows[:, 0, :] + rows[:, 1, :] * (1 << self._config.field_bits)
        return list(packed)

    def _unpack_all(self, rows: list[npt.NDArray[np.int64]], length: int) -> npt.NDArray[np.int64]:
        n = self._config.poly_modulus_degree
        f = self._config.field_bits
        half = 1 << (f - 1)
        slots = np.stack(rows) if rows else np.zeros((0, n), dtype=np.int64)
        lo = ((slots + half) & ((1 << f) - 1)) - half
        hi = (slots - lo) >> f
        return np.concatenate([lo, hi], axis=1).reshape(-1)[:length]

    # ------------------------------------------------------------------ client side
    def slot_count(self, length: int) -> int:
        """Slots of a payload of ``length`` values (every ciphertext's, padding included)."""
        return -(-length // self._config.values_per_ciphertext) * self._config.poly_modulus_degree

    def encode_update(
        self,
        vector: FloatVector,
        rng: np.random.Generator | None = None,
        slot_mask: npt.NDArray[np.uint64] | None = None,
    ) -> tuple[bytes, float | None]:
        """Quantize, pack and encrypt; return the payload and the rounding error.

        ``slot_mask`` (residues below t, :meth:`slot_count` of them) is added to the packed
        slots modulo t before encryption: then every encrypted slot is uniform modulo t.
        """
        import tenseal.sealapi as seal

        if self._encryptor is None:
            raise MissingSecretKeyError("encryption needs the secret BFV key bundle")
        q, error = self.quantize(vector, rng)
        rows = self._pack(q)
        n = self._config.poly_modulus_degree
        if slot_mask is not None:
            if slot_mask.shape != (len(rows) * n,):
                raise ValueError(
                    f"slot mask has {slot_mask.size} values, the update {len(rows) * n} slots"
                )
            # Signed packed values lie in (-t/2, t/2) and mask residues in [0, t): their
            # sum lies in (-t/2, 3t/2), so one conditional shift each way reduces it.
            t = np.int64(self._t)
            masked = np.stack(rows)
            masked += slot_mask.reshape(len(rows), n).view(np.int64)
            np.subtract(masked, t, out=masked, where=masked >= t)
            np.add(masked, t, out=masked, where=masked < 0)
            rows = list(masked)
        chunks = []
        for row in rows:
            plain = seal.Plaintext()
            self._encoder.encode(row.tolist(), plain)
            seeded = self._files.dump(self._encryptor.encrypt_symmetric(plain))
            chunks.append(self._layout.from_seal(seeded))
        return pack_payload(self.codec_id, self.fingerprint, q.size, chunks), error

    def decode(self, payload: bytes) -> npt.NDArray[np.float64]:
        """Decrypt, unpack and dequantize a payload (a client's update or a sum).

        Raises:
            MissingSecretKeyError: this instance holds no secret key.

        """
        fields, length = self._decrypt_fields(payload)
        return fields[:length].astype(np.float64) * self._config.quant_step

    def decode_aggregate(self, payload: bytes, summands: int | None) -> npt.NDArray[np.float64]:
        """Decrypt a sum of ``summands`` updates, refusing one that no such sum can be.

        Every client's integers are at most :attr:`EncryptionConfig.max_quantized` in
        magnitude, so a sum of ``summands`` of them (``None``: ``max_clients``) is at
        most that many times it, and its padding fields are zero. A corrupted or
        forged ciphertext decrypts to residues spread over the whole field, so almost
        every field breaks the bound.

        Raises:
            GlobalModelRejectedError: the sum is out of that range.

        """
        fields, length = self._decrypt_fields(payload)
        limit = self._config.max_clients
        count = limit if summands is None else min(summands, limit)
        bound = count * self._config.max_quantized
        beyond = int(np.count_nonzero(np.abs(fields[:length]) > bound))
        if beyond or np.any(fields[length:]):
            raise GlobalModelRejectedError(
                f"global model out of range: {beyond} of {length} values beyond what {count} "
                f"bounded updates can sum to, or non-zero padding"
            )
        return fields[:length].astype(np.float64) * self._config.quant_step

    def _decrypt_fields(self, payload: bytes) -> tuple[npt.NDArray[np.int64], int]:
        """Every packed field of a payload (padding included) and the vector length."""
        import tenseal.sealapi as seal

        if self._decryptor is None:
            raise MissingSecretKeyError("this BFV bundle holds no secret key and cannot decrypt")
        header, _ = unpack_payload(payload)
        loaded = self.validate(payload)
        rows = []
        for ct in loaded:
            plain = seal.Plaintext()
            self._decryptor.decrypt(ct, plain)
            rows.append(np.asarray(self._encoder.decode_int64(plain), dtype=np.int64))
        padded = len(rows) * self._config.values_per_ciphertext
        return self._unpack_all(rows, padded), header.length

    def integer_sum(self, payload: bytes) -> npt.NDArray[np.int64]:
        """Decrypt a payload to its exact integer sum (tests and benchmarks)."""
        values = self.decode(payload) / self._config.quant_step
        return np.rint(values).astype(np.int64)

    # ------------------------------------------------------------------ server side
    def _check_seal_header(self, i: int, chunk: bytes) -> None:
        if len(chunk) < SEAL_HEADER.size:
            raise MalformedPayloadError(f"ciphertext {i} is shorter than a SEAL header")
        magic, head_size, major, _minor, compr, _rsv, size = SEAL_HEADER.unpack_from(chunk)
        if magic != SEAL_MAGIC or head_size != SEAL_HEADER.size or major not in (3, 4):
            raise MalformedPayloadError(f"ciphertext {i} has no valid SEAL header")
        if compr > 2 or size != len(chunk):
            raise MalformedPayloadError(
                f"ciphertext {i} declares {size} bytes, holds {len(chunk)} (truncated or padded)"
            )
        if size > self._max_chunk:
            raise MalformedPayloadError(
                f"ciphertext {i} has {size} bytes, more than the {self._max_chunk} that a "
                "ciphertext of these parameters can need"
            )

    def _check_count(self, header: PayloadHeader, chunks: list[bytes]) -> None:
        expected = -(-header.length // self._config.values_per_ciphertext)
        if len(chunks) != expected:
            raise MalformedPayloadError(
                f"payload of {header.length} values must hold {expected} ciphertexts, "
                f"holds {len(chunks)}"
            )

    def _load_one(self, i: int, chunk: bytes) -> Any:
        import tenseal.sealapi as seal

        self._check_seal_header(i, chunk)
        ct = seal.Ciphertext()
        try:
            self._files.load(chunk, lambda p: ct.load(self._ctx, p))
        except Exception as exc:
            raise MalformedPayloadError(f"ciphertext {i} does not deserialize: {exc}") from exc
        if (
            ct.size() != 2
            or ct.parms_id() != self._parms_id
            or ct.poly_modulus_degree() != self._config.poly_modulus_degree
            or ct.coeff_modulus_size() != len(self._q)
            or ct.is_ntt_form()
            or ct.is_transparent()
            or not seal.is_valid_for(ct, self._ctx)
        ):
            raise MalformedPayloadError(
                f"ciphertext {i} is not a fresh two-part BFV ciphertext at the data level "
                "of this federation's parameters"
            )
        return ct

    def _load_chunks(self, header: PayloadHeader, chunks: list[bytes]) -> list[Any]:
        self._check_count(header, chunks)
        return [self._load_one(i, chunk) for i, chunk in enumerate(chunks)]

    def _admit_chunks(self, header: PayloadHeader, chunks: list[bytes]) -> CheckedUpload:
        """Canonical seeded ciphertexts only; each keyed by its seed and by its c0.

        A seeded ciphertext is ``(c0, c1)`` with ``c1`` expanded from the seed. An honest
        one has a fresh 512-bit seed and a ``c0`` as uniform as ``c1`` (it is
        ``-(c1 s + e) + delta m``), so no two share either half. A re-sent ciphertext keeps
        both halves whatever its encoding, and one altered by someone without the key
        (a constant added to ``c0``, or another seed) keeps one of them: any half seen
        before marks a replay.
        """
        self._check_count(header, chunks)
        loaded: list[Any] = []
        keys: list[int] = []
        for i, chunk in enumerate(chunks):
            c0, seed = self._layout.parse(i, chunk)
            loaded.append(self._load_one(i, chunk))
            keys += [replay_key(b"bfv-seed", seed), replay_key(b"bfv-c0", c0)]
        return CheckedUpload(loaded, tuple(keys))

    def _sum_chunks(
        self, loaded: Sequence[list[Any]], slot_offset: npt.NDArray[np.uint64] | None = None
    ) -> list[bytes]:
        if len(loaded) > self._config.max_clients:
            raise ValueError(
                f"refusing to add {len(loaded)} updates: max_clients="
                f"{self._config.max_clients} bounds the sum inside the BFV field and noise budget"
            )
        import tenseal.sealapi as seal

        totals = list(loaded[0])
        if len(loaded) > 1:
            # Fresh destinations: the loaded ciphertexts themselves stay untouched.
            totals = []
            for a, b in zip(loaded[0], loaded[1], strict=True):
                total = seal.Ciphertext(self._ctx)
                self._evaluator.add(a, b, total)
                totals.append(total)
        for payload in loaded[2:]:
            for total, ct in zip(totals, payload, strict=True):
                self._evaluator.add_inplace(total, ct)
        if slot_offset is not None:
            n = self._config.poly_modulus_degree
            if slot_offset.shape != (len(totals) * n,):
                raise ValueError(
                    f"slot offset has {slot_offset.size} values, the sum {len(totals) * n} slots"
                )
            shifted = []
            for i, total in enumerate(totals):
                plain = seal.Plaintext()
                self._encoder.encode(slot_offset[i * n : (i + 1) * n].tolist(), plain)
                # Into a fresh ciphertext: with one payload, ``total`` is the loaded one.
                dest = seal.Ciphertext(self._ctx)
                self._evaluator.add_plain(total, plain, dest)
                shifted.append(dest)
            totals = shifted
        return [self._files.dump(t) for t in totals]

    def noise_budget_bits(self, payload: bytes) -> int:
        """Smallest SEAL invariant noise budget over a payload's ciphertexts (clients only)."""
        if self._decryptor is None:
            raise MissingSecretKeyError("the noise budget needs the secret key")
        return min(int(self._decryptor.invariant_noise_budget(ct)) for ct in self.validate(payload))
