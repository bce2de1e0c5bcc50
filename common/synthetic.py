"""The synthetic(alpha, beta) federated dataset of Li et al. (FedProx, MLSys 2020).

The generator of "Federated Optimization in Heterogeneous Networks" (also in the LEAF
benchmark), with 60 features and 10 classes. Client ``k`` has

* its own model: ``u_k ~ N(0, alpha^2)``, ``W_k ~ N(u_k, 1)`` (60x10), ``b_k ~ N(u_k, 1)``;
  ``alpha`` controls how much the clients' *models* differ;
* its own features: ``B_k ~ N(0, beta^2)``, ``v_k ~ N(B_k, 1)`` (60 values), and
  ``x ~ N(v_k, Sigma)`` with ``Sigma = diag(j^-1.2)``, ``j = 1..60``; ``beta`` controls
  how much the clients' *data* differ;
* labels ``y = argmax(softmax(W_k x + b_k))``;
* a power-law number of examples, lognormal as in LEAF: ``n_k = min(floor(LN(mu,
  sigma)) + min_train, max_train)`` training examples (FedProx: ``mu=4, sigma=2``), plus
  ``max(1, round(test_fraction * n_k))`` test examples of its own.

``synthetic:0,0`` is the least heterogeneous setting, ``synthetic:1,1`` the usual
heterogeneous one (FedProx also uses ``synthetic:0.5,0.5``).

Every client's data depends only on ``(spec, seed, k)``: client ``k`` draws from its own
generator ``numpy.random.default_rng([seed, k])``, so a client can build its own data
without generating anybody else's, a federation of 1,000 clients costs each client
microseconds beyond its own examples, and client ``k`` gets the same data whatever the
federation's size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SYNTHETIC_PREFIX = "synthetic"
FEATURES = 60
CLASSES = 10


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of a synthetic(alpha, beta) federation.

    Attributes:
        alpha: Standard deviation of the clients' model means ``u_k`` (model skew).
        beta: Standard deviation of the clients' feature-mean centres ``B_k`` (data skew).
        size_mu: Mean of the log of the size draw (lognormal).
        size_sigma: Standard deviation of the log of the size draw.
        min_train: Fewest training examples of a client (added to the draw).
        max_train: Most training examples of a client (the draw is clipped).
        test_fraction: A client's test examples, relative to its training examples.

    """

    alpha: float = 1.0
    beta: float = 1.0
    size_mu: float = 4.0
    size_sigma: float = 2.0
    min_train: int = 10
    max_train: int = 1000
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "size_sigma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"synthetic {name} must be a finite number >= 0, got {value!r}")
        if not math.isfinite(self.size_mu):
            raise ValueError(f"synthetic size_mu must be finite, got {self.size_mu!r}")
        if not 1 <= self.min_train <= self.max_train:
            raise ValueError(
                f"synthetic sizes need 1 <= min_train <= max_train, got "
                f"{self.min_train}, {self.max_train}"
            )
        if not 0.0 < self.test_fraction <= 1.0:
            raise ValueError(
                f"synthetic test_fraction must lie in (0, 1], got {self.test_fraction!r}"
            )

    @classmethod
    def parse(cls, name: str) -> SyntheticSpec:
        """Parse ``synthetic:ALPHA,BETA`` (e.g. ``synthetic:1,1``, ``synthetic:0.5,0.5``).

        Raises:
            ValueError: the name is not of that form or a value is out of range.

        """
        prefix, sep, arg = name.strip().partition(":")
        if prefix != SYNTHETIC_PREFIX or not sep:
            raise ValueError(
                f"bad synthetic dataset {name!r}; use synthetic:ALPHA,BETA, e.g. synthetic:1,1"
            )
        parts = arg.split(",")
        try:
            if len(parts) != 2:
                raise ValueError("expected two numbers")
            alpha, beta = (float(p) for p in parts)
        except ValueError as exc:
            raise ValueError(
                f"bad synthetic dataset {name!r}: {exc}; use synthetic:ALPHA,BETA, "
                "e.g. synthetic:1,1"
            ) from exc
        return cls(alpha=alpha, beta=beta)

    def __str__(self) -> str:
        return f"{SYNTHETIC_PREFIX}:{self.alpha:g},{self.beta:g}"


def is_synthetic(name: str) -> bool:
    """Whether a dataset name asks for the synthetic federation (``synthetic:...``)."""
    return name.strip().partition(":")[0] == SYNTHETIC_PREFIX


@dataclass(frozen=True)
class ClientData:
    """One client's synthetic examples: ``x_*`` float32 (n, 60), ``y_*`` int64 (n,)."""

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]


def _client_rng(seed: int, client: int) -> np.random.Generator:
    if client < 0:
        raise ValueError(f"client index must be >= 0, got {client}")
    return np.random.default_rng([seed, client])


def _sizes(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[int, int]:
    draw = rng.lognormal(spec.size_mu, spec.size_sigma)
    n_train = int(min(math.floor(draw) + spec.min_train, spec.max_train))
    n_test = max(1, round(spec.test_fraction * n_train))
    return n_train, n_test


def client_sizes(spec: SyntheticSpec, num_clients: int, seed: int) -> list[tuple[int, int]]:
    """``(train, test)`` example counts of every client, without generating any data."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    return [_sizes(spec, _client_rng(seed, k)) for k in range(num_clients)]


_FEATURE_STD = np.power(np.arange(1, FEATURES + 1, dtype=np.float64), -0.6)  # sqrt(j^-1.2)


@functools.lru_cache(maxsize=64)
def client_data(spec: SyntheticSpec, seed: int, client: int) -> ClientData:
    """The synthetic examples of client ``client`` (deterministic in its arguments)."""
    rng = _client_rng(seed, client)
    n_train, n_test = _sizes(spec, rng)  # first draw: client_sizes() repeats it alone
    u = rng.normal(0.0, spec.alpha)
    big_b = rng.normal(0.0, spec.beta)
    w = rng.normal(u, 1.0, (FEATURES, CLASSES))
    b = rng.normal(u, 1.0, CLASSES)
    v = rng.normal(big_b, 1.0, FEATURES)
    n = n_train + n_test
    x = v + rng.standard_normal((n, FEATURES)) * _FEATURE_STD
    # argmax of softmax(xW + b) is argmax of the logits: softmax is monotone.
    y = np.argmax(x @ w + b, axis=1).astype(np.int64)
    x32 = x.astype(np.float32)
    return ClientData(x32[:n_train], y[:n_train], x32[n_train:], y[n_train:])
