"""Frozen configuration dataclasses for privacy, encryption and federation.

Every constructor validates its fields and raises :class:`ValueError` with a precise
message, so a bad setting fails when the configuration is built, not mid-run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

AccountantName = Literal["rdp", "prv", "gdp"]
SchemeName = Literal["ckks", "none"]

# Largest total coefficient-modulus bit count at 128-bit classical security
# (HomomorphicEncryption.org standard, as enforced by Microsoft SEAL).
MAX_COEFF_MODULUS_BITS: dict[int, int] = {
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level differential privacy for one client (DP-SGD with Opacus).

    Attributes:
        target_epsilon: Total epsilon the client may spend over the whole federation.
            ``None`` turns DP off (plain SGD).
        delta: Target delta of the (epsilon, delta) guarantee.
        max_grad_norm: Per-sample gradient clipping norm C.
        accountant: Opacus accountant used to calibrate and compose: ``rdp``, ``prv``
            or ``gdp``.
        noise_multiplier: Explicit sigma. ``None`` (the default) calibrates sigma once
            per client for its planned participation.

    """

    target_epsilon: float | None = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: AccountantName = "rdp"
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
        if self.accountant not in ("rdp", "prv", "gdp"):
            raise ValueError(
                f"accountant must be one of 'rdp', 'prv', 'gdp', got {self.accountant!r}"
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

    The default is CKKS with N=8192 and coefficient moduli [60, 40]: one 60-bit data
    prime and one special prime for key switching. The server only adds ciphertexts, so
    no multiplicative depth is needed. With scale 2^36 the 60-bit data prime leaves 23
    bits of integer headroom (plus sign) for the weighted sums; fresh encryption noise
    is about 2^-36 * sqrt(N) in absolute terms, i.e. below 1e-7 per value.

    Attributes:
        scheme: ``ckks`` or ``none`` (plaintext fp32, for comparison runs).
        poly_modulus_degree: Ring dimension N; N/2 values are packed per ciphertext.
        coeff_mod_bit_sizes: Bit sizes of the coefficient-modulus primes; the last one
            is SEAL's special prime.
        scale_bits: log2 of the CKKS encoding scale.
        max_clients: Most updates the server may add into one aggregate. Together with
            the headroom it bounds each client's weighted update, so that a sum can
            never overflow the data modulus.

    """

    scheme: SchemeName = "ckks"
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    scale_bits: int = 36
    max_clients: int = 1000

    def __post_init__(self) -> None:
        if self.scheme not in ("ckks", "none"):
            raise ValueError(f"scheme must be 'ckks' or 'none', got {self.scheme!r}")
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
            raise ValueError(f"every coefficient-modulus prime must be 17..60 bits, got {bits}")
        if sum(bits) > MAX_COEFF_MODULUS_BITS[n]:
            raise ValueError(
                f"coeff_mod_bit_sizes {bits} total {sum(bits)} bits, above the 128-bit "
                f"security limit of {MAX_COEFF_MODULUS_BITS[n]} bits for N={n}"
            )
        if self.max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {self.max_clients}")
        data_bits = sum(bits[:-1])
        if not 20 <= self.scale_bits <= data_bits - 10:
            raise ValueError(
                f"scale_bits must be in [20, {data_bits - 10}] so that sums keep at least "
                f"10 bits of headroom under the {data_bits}-bit data modulus, "
                f"got {self.scale_bits}"
            )

    @property
    def enabled(self) -> bool:
        """Whether updates are encrypted."""
        return self.scheme != "none"

    @property
    def headroom_bits(self) -> int:
        """Bits of integer magnitude a decoded sum may use (one bit is kept for the sign)."""
        return sum(self.coeff_mod_bit_sizes[:-1]) - self.scale_bits - 1

    @property
    def max_update_magnitude(self) -> float:
        """Largest absolute value one client's weighted update may hold.

        ``max_clients`` such values still sum below the headroom, with a factor 2 margin
        for the CKKS encoding error.
        """
        return float(2 ** (self.headroom_bits - 1)) / self.max_clients

    @property
    def slots(self) -> int:
        """Values packed per ciphertext (N/2 for CKKS)."""
        return self.poly_modulus_degree // 2

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of every field."""
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return d


@dataclass(frozen=True)
class FederationConfig:
    """How the federation trains.

    Attributes:
        rounds: Number of federated rounds.
        fraction_train: Fraction of connected nodes sampled for training each round.
        min_train_clients: Minimum clients: nodes to wait for and sample at least, and
            valid updates a round needs before it changes the global model.
        fraction_evaluate: Fraction of nodes asked for federated evaluation each round.
        local_epochs: Epochs of local training per round.
        batch_size: (Expected) batch size; with DP it sets the Poisson sample rate.
        learning_rate: Local SGD learning rate (of round 1).
        lr_schedule: ``cosine`` decays the rate over the rounds to 10% of
            ``learning_rate`` in the last round, which damps the DP noise of the final
            rounds; ``constant`` keeps it.
        momentum: Local SGD momentum.
        round_timeout: Seconds the server waits for replies in one round.
        seed: Seed of node sampling and of the shared model initialisation.

    """

    rounds: int = 30
    fraction_train: float = 1.0
    min_train_clients: int = 2
    fraction_evaluate: float = 0.0
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.1
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    momentum: float = 0.9
    round_timeout: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        if self.fraction_train == 0.0:
            raise ValueError("fraction_train must be > 0: nobody would train")
        if self.min_train_clients < 1:
            raise ValueError(f"min_train_clients must be >= 1, got {self.min_train_clients}")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(
                f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if self.round_timeout <= 0:
            raise ValueError(f"round_timeout must be positive, got {self.round_timeout!r}")

    def learning_rate_at(self, server_round: int) -> float:
        """The local learning rate of ``server_round`` (from 1) under the schedule."""
        if self.lr_schedule == "constant" or self.rounds == 1:
            return self.learning_rate
        progress = (min(max(server_round, 1), self.rounds) - 1) / (self.rounds - 1)
        return self.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of every field."""
        return asdict(self)
