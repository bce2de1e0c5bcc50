"""Frozen configuration dataclasses for privacy, encryption and federation.

Every constructor validates its fields and raises :class:`ValueError` with a precise
message, so a bad setting fails when the configuration is built, not mid-run.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from logging import WARNING
from typing import Any, Literal

from sepals.common.log import log

AccountantName = Literal["pld", "rdp"]
#: The accountants a client may compose its epsilon with: ``pld``, Google
#: ``dp-accounting``'s privacy-loss-distribution accountant (the default: the tightest),
#: and Opacus's ``rdp``. Both give upper bounds on epsilon for both neighbouring
#: relations sepals reports (docs/privacy.md#neighbouring-relations); Opacus's ``gdp`` is
#: an asymptotic approximation, not a bound, and is not offered.
ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")
SchemeName = Literal["bfv", "ckks", "none"]

# Largest magnitude of the noise one fresh symmetric BFV encryption adds, in units of
# the ciphertext modulus: SEAL samples the error from a centred binomial (or clipped
# normal) distribution bounded by 21, and the scaled message adds a rounding error of
# at most 1/2. Rounded up.
BFV_NOISE_PER_SUMMAND = 22
#: Default largest change of one weight from the shared round-0 model that an update
#: carries (BFV): room for weights of order 1 to move by several units, at a grid step
#: of 1.5e-3 with 100 clients a round (1.5e-4 with 10).
DEFAULT_UPDATE_BOUND = 16.0
# Fewest quantization levels per sign that a BFV configuration may leave each client.
MIN_QUANT_LEVELS = 256
# Below this many levels per sign (a grid step above about 0.1% of ``update_bound``), a
# BFV configuration is accepted but flagged: see :attr:`EncryptionConfig.quant_warning`.
WARN_QUANT_LEVELS = 1024

# Largest total coefficient-modulus bit count at 128-bit classical security
# (HomomorphicEncryption.org standard, as enforced by Microsoft SEAL).
MAX_COEFF_MODULUS_BITS: dict[int, int] = {
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}
#: The rings a BFV configuration is sized to (:func:`bfv_ring_for`), smallest first.
BFV_RINGS: tuple[int, ...] = (4096, 8192)


def bfv_ciphertexts(vector_length: int, poly_modulus_degree: int) -> int:
    """BFV ciphertexts of an update of ``vector_length`` values: two values per slot."""
    return -(-vector_length // (2 * poly_modulus_degree))


def bfv_ring_for(vector_length: int) -> int:
    """The BFV ring degree N that makes an update of ``vector_length`` values smallest.

    Rule: among :data:`BFV_RINGS`, the N with the fewest ciphertext coefficients,
    ``ceil(L / 2N) * N`` (the bytes of an upload, and of the aggregate, are that times
    the coefficient width); on a tie the larger N, which needs fewer ciphertexts and so
    less per-ciphertext work. So an update of at most 8,192 values (one N = 4096
    ciphertext) takes N = 4096, half the bytes of one N = 8192 ciphertext; above, N =
    8192 unless N = 4096 saves bytes (an odd number of N = 4096 ciphertexts, e.g.
    16,385..24,576 values: three N = 4096 ciphertexts against two N = 8192 ones).

    Both rings are 128-bit secure with the default coefficient modulus (60 + 40 = 100
    bits; the HomomorphicEncryption.org standard allows 109 bits at N = 4096, 218 at
    N = 8192), and a sum is exact at either ring under the same conditions, since a
    slot's field layout, the plaintext modulus and the noise bound do not depend on N
    (see :class:`EncryptionConfig`).

    Raises:
        ValueError: ``vector_length < 1``.

    """
    if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 1:
        raise ValueError(f"vector_length must be an integer >= 1, got {vector_length!r}")
    # Fewest coefficients, then the largest ring: min over (coefficients, -N).
    return min(BFV_RINGS, key=lambda n: (bfv_ciphertexts(vector_length, n) * n, -n))


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level differential privacy for one client (DP-SGD with Opacus).

    Attributes:
        target_epsilon: Total epsilon the client may spend over the whole federation.
            ``None`` turns DP off (plain SGD).
        delta: Target delta of the (epsilon, delta) guarantee.
        max_grad_norm: Per-sample gradient clipping norm C.
        accountant: The accountant that calibrates sigma, composes epsilon and enforces
            the budget: ``pld`` (the default; Google ``dp-accounting``'s pessimistic
            privacy-loss-distribution accountant, about 8% less noise than ``rdp`` for
            the same epsilon, at ~0.2 s per epsilon) or ``rdp`` (Opacus's).
        noise_multiplier: Explicit sigma. ``None`` (the default) calibrates sigma once
            per client for its planned participation.

    """

    target_epsilon: float | None = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: AccountantName = "pld"
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        if self.target_epsilon is not None and not (
            math.isfinite(self.target_epsilon) and self.target_epsilon > 0
        ):
            raise ValueError(
                f"target_epsilon must be a positive finite number or None (DP off), "
                f"got {self.target_epsilon!r}"
            )
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta!r}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(
                f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}"
            )
        if self.noise_multiplier is not None and not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            raise ValueError(
                f"noise_multiplier must be >= 0 or None, got {self.noise_multiplier!r}"
            )

    @property
    def enabled(self) -> bool:
        """Whether DP-SGD is on."""
        return self.target_epsilon is not None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of every field."""
        return asdict(self)


@dataclass(frozen=True)
class EncryptionConfig:
    """Homomorphic encryption of model updates.

    ``bfv`` (the default) is sepals' compact codec: every client value is quantized to an
    integer with stochastic rounding on a fixed grid (step :attr:`quant_step`), two
    integers are packed into each BFV plaintext slot, and the result is encrypted as a
    *seeded* symmetric ciphertext through ``tenseal.sealapi`` (half the ciphertext is a
    64-byte seed). The server only adds; BFV addition of integers is exact, so the only
    error is the client's own rounding, at most one grid step per value.

    Overflow is impossible by construction, and checked here: a sum of ``max_clients``
    packed values, each of magnitude at most :attr:`max_quantized`, fits in its field
    (:attr:`field_capacity`), and the encryption noise of that many summands stays
    below the decryption threshold ``q / (2 t)`` with a factor-2 margin.

    ``ckks`` is the earlier codec, kept for comparison: CKKS with N=8192 and
    coefficient moduli [60, 40] (one data prime plus the special prime); with scale
    2^36 the 60-bit data prime leaves 23 bits of integer headroom for the weighted sums.

    Attributes:
        scheme: ``bfv`` (default), ``ckks`` or ``none`` (plaintext fp32).
        poly_modulus_degree: Ring dimension N. BFV packs 2N values per ciphertext,
            CKKS N/2. Provisioning and the simulations size a BFV ring to the model
            (:meth:`sized_for`: N = 4096 for updates of up to 8,192 values).
        coeff_mod_bit_sizes: Bit sizes of the coefficient-modulus primes; the last one
            is SEAL's special prime, the others form the data modulus q of every
            ciphertext that is sent.
        scale_bits: log2 of the CKKS encoding scale (CKKS only).
        max_clients: Most updates the server may add into one aggregate: the number of
            clients *sampled* per round (see :func:`sampled_per_round`), not the size
            of the federation. It bounds each client's share of the headroom, so that a
            sum can never overflow; the server never samples more per round.
        plain_modulus_bits: Bit size of the BFV plaintext modulus t, a batching prime
            (BFV only). Each slot holds two fields of ``plain_modulus_bits // 2`` bits.
        update_bound: Largest absolute value a client may encode (BFV only). A client
            encodes its weighted change from the shared round-0 model,
            ``min(n, weight_cap) / weight_cap * (weights - initial)``, which does not grow
            with its dataset; a value beyond the bound is clamped to it on the client
            (post-processing of its DP update) and the count is reported. Together
            with ``max_clients`` it fixes the quantization step:
            ``update_bound / (field_capacity / max_clients)``.

    """

    scheme: SchemeName = "bfv"
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    scale_bits: int = 36
    max_clients: int = 100
    plain_modulus_bits: int = 44
    update_bound: float = DEFAULT_UPDATE_BOUND

    def __post_init__(self) -> None:
        if self.scheme not in ("bfv", "ckks", "none"):
            raise ValueError(f"scheme must be 'bfv', 'ckks' or 'none', got {self.scheme!r}")
        if self.scheme == "none":
            return
        n = self.poly_modulus_degree
        if n not in MAX_COEFF_MODULUS_BITS:
            raise ValueError(
                f"poly_modulus_degree must be one of {sorted(MAX_COEFF_MODULUS_BITS)}, got {n}"
            )
        bits = tuple(self.coeff_mod_bit_sizes)
        if len(bits) < 2:
            raise ValueError(
                "coeff_mod_bit_sizes needs at least two primes (a data prime and the "
                f"special prime for key switching), got {bits}"
            )
        if any(not 17 <= b <= 60 for b in bits):
            raise ValueError(f"coeff_mod_bit_sizes: every prime must be 17..60 bits, got {bits}")
        if sum(bits) > MAX_COEFF_MODULUS_BITS[n]:
            raise ValueError(
                f"coeff_mod_bit_sizes {bits} total {sum(bits)} bits, above the 128-bit "
                f"security limit of {MAX_COEFF_MODULUS_BITS[n]} bits for N={n}"
            )
        if self.max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {self.max_clients}")
        if self.scheme == "bfv":
            self._check_bfv()
            return
        data_bits = sum(bits[:-1])
        if not 20 <= self.scale_bits <= data_bits - 10:
            raise ValueError(
                f"scale_bits must be in [20, {data_bits - 10}] so that sums keep at least "
                f"10 bits of headroom under the {data_bits}-bit data modulus, "
                f"got {self.scale_bits}"
            )

    def _check_bfv(self) -> None:
        t_bits = self.plain_modulus_bits
        min_t_bits = (2 * self.poly_modulus_degree).bit_length() + 1
        if not min_t_bits <= t_bits <= 60:
            raise ValueError(
                f"plain_modulus_bits must be in [{min_t_bits}, 60] for N="
                f"{self.poly_modulus_degree} (a batching prime t = 1 mod 2N), got {t_bits}"
            )
        if not (math.isfinite(self.update_bound) and self.update_bound > 0):
            raise ValueError(f"update_bound must be positive and finite, got {self.update_bound!r}")
        # Noise: a sum of k fresh symmetric ciphertexts decrypts exactly while its noise,
        # at most k * BFV_NOISE_PER_SUMMAND, stays below q / (2t). Require a factor 2.
        margin_bits = self.bfv_noise_margin_bits
        noise = 2 * BFV_NOISE_PER_SUMMAND * self.max_clients
        if noise > 2**margin_bits:
            most = 2**margin_bits // (2 * BFV_NOISE_PER_SUMMAND)
            raise ValueError(
                f"max_clients={self.max_clients} overflows the BFV noise budget: the sum's "
                f"noise bound 2*{BFV_NOISE_PER_SUMMAND}*{self.max_clients} = {noise} exceeds "
                f"q/(2t) >= 2^{margin_bits}; with plain_modulus_bits={t_bits} and a "
                f"{sum(self.coeff_mod_bit_sizes[:-1])}-bit data modulus at most {most} "
                "clients fit (lower plain_modulus_bits or max_clients)"
            )
        if self.max_quantized < MIN_QUANT_LEVELS:
            raise ValueError(
                f"max_clients={self.max_clients} leaves each client only "
                f"{self.max_quantized} quantization levels per sign in a "
                f"{self.field_bits}-bit field (at least {MIN_QUANT_LEVELS} needed): the "
                f"packed sum of max_clients values must stay below {self.field_capacity}; "
                "lower max_clients or raise plain_modulus_bits"
            )
        warning = self.quant_warning
        if warning is not None:
            _warn_once(warning)

    @property
    def quant_warning(self) -> str | None:
        """BFV: why the quantization grid is coarse, or ``None`` when it is fine.

        The grid is flagged when it leaves each client fewer than
        :data:`WARN_QUANT_LEVELS` levels per sign, i.e. when :attr:`quant_step` exceeds
        about 0.1% of ``update_bound``. The decoded FedAvg model is off by at most
        ``quant_step`` per weight (each client's rounding error, weighted and averaged):
        a coarse step is a visible error. Such a configuration is accepted;
        constructing it logs this message once as a WARNING.
        """
        if self.scheme != "bfv" or self.max_quantized >= WARN_QUANT_LEVELS:
            return None
        return (
            f"BFV quantization is coarse: max_clients={self.max_clients} with "
            f"plain_modulus_bits={self.plain_modulus_bits} leaves {self.max_quantized} levels "
            f"per sign (fewer than {WARN_QUANT_LEVELS}), a grid step of {self.quant_step:.3g} "
            f"for update_bound={self.update_bound:g}; the averaged model is off by up to one "
            "step per weight. Sample fewer clients per round, raise plain_modulus_bits (if "
            "the noise budget allows) or lower update_bound"
        )

    @property
    def enabled(self) -> bool:
        """Whether updates are encrypted."""
        return self.scheme != "none"

    @property
    def headroom_bits(self) -> int:
        """CKKS: bits of integer magnitude a decoded sum may use (one bit for the sign)."""
        return sum(self.coeff_mod_bit_sizes[:-1]) - self.scale_bits - 1

    @property
    def max_update_magnitude(self) -> float:
        """Largest absolute value one client's weighted change may hold.

        BFV: :attr:`update_bound`. CKKS: ``max_clients`` such values still sum below the
        headroom, with a factor 2 margin for the CKKS encoding error.
        """
        if self.scheme == "bfv":
            return self.update_bound
        return float(2 ** (self.headroom_bits - 1)) / self.max_clients

    @property
    def slots(self) -> int:
        """Values packed per CKKS ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    # ------------------------------------------------------------------ BFV layout
    @property
    def bfv_noise_margin_bits(self) -> int:
        """log2 of a lower bound of q / (2t): each data prime of b bits is >= 2^(b-1)."""
        q_low = sum(b - 1 for b in self.coeff_mod_bit_sizes[:-1])
        return q_low - self.plain_modulus_bits - 1

    @property
    def field_bits(self) -> int:
        """BFV: bits of the low field of a slot; a slot holds ``lo + hi * 2**field_bits``."""
        return self.plain_modulus_bits // 2

    @property
    def field_capacity(self) -> int:
        """BFV: largest magnitude a *summed* field may reach and still decode exactly.

        A slot value ``lo + hi * 2^F`` must stay inside (-t/2, t/2) with t > 2^(b-1)
        (b = ``plain_modulus_bits``), and ``lo`` inside the centred range of its F bits.
        """
        f = self.field_bits
        by_modulus = 2 ** (self.plain_modulus_bits - 2) // (2**f + 1)
        return min(by_modulus, 2 ** (f - 1) - 1)

    @property
    def max_quantized(self) -> int:
        """BFV: largest magnitude of one client's quantized value."""
        return self.field_capacity // self.max_clients

    @property
    def quant_step(self) -> float:
        """BFV: the fixed-point grid step shared by every client.

        Stochastic rounding of a value ``|x| <= update_bound`` lands on an integer of
        magnitude at most ``update_bound / quant_step + 1 = max_quantized``.
        """
        return self.update_bound / (self.max_quantized - 1)

    @property
    def values_per_ciphertext(self) -> int:
        """Values one ciphertext carries: 2N for BFV (two per slot), N/2 for CKKS."""
        if self.scheme == "bfv":
            return 2 * self.poly_modulus_degree
        return self.slots

    def sized_for(self, vector_length: int) -> EncryptionConfig:
        """A copy with the BFV ring chosen for an update of ``vector_length`` values.

        BFV only (CKKS and plaintext configurations come back unchanged): the ring is
        :func:`bfv_ring_for`'s, whatever ``poly_modulus_degree`` says, unless the other
        settings cannot be exact or secure there (a coefficient modulus above that
        ring's 128-bit limit, say): then, of the rings in :data:`BFV_RINGS` where they
        are valid, the one with the fewest bytes by the same rule.

        Raises:
            ValueError: ``vector_length < 1``, or no ring of :data:`BFV_RINGS` holds
                this configuration (the message is that of the largest ring).

        """
        best = bfv_ring_for(vector_length)
        if self.scheme != "bfv":
            return self
        valid: list[EncryptionConfig] = []
        errors: list[ValueError] = []
        for n in BFV_RINGS:
            try:
                valid.append(replace(self, poly_modulus_degree=n))
            except ValueError as exc:
                errors.append(exc)
        if not valid:
            raise errors[-1]
        for config in valid:
            if config.poly_modulus_degree == best:
                return config
        return min(
            valid,
            key=lambda c: (
                bfv_ciphertexts(vector_length, c.poly_modulus_degree) * c.poly_modulus_degree,
                -c.poly_modulus_degree,
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of every field (and the BFV quantization step)."""
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        if self.scheme == "bfv":
            d["quant_step"] = self.quant_step
        return d


@functools.lru_cache(maxsize=32)
def _warn_once(message: str) -> None:
    """Log ``message`` as a WARNING, once per process and distinct message."""
    log(WARNING, "%s", message)
