"""The secret randomness of DP-SGD: Poisson sampling and Gaussian noise from a CSPRNG.

The epsilon a client reports rests on two random choices that nobody else may predict:

* **which examples each step samples.** Privacy amplification by subsampling assumes
  the adversary does not know the batches; with the batches known, a step costs the
  full, unamplified epsilon of the Gaussian mechanism.
* **the Gaussian noise of each step.** Whoever can regenerate the noise can subtract it.

Both are drawn here from AES-128 in counter mode (``randomgen``'s ``AESCounter``, which
uses AES-NI where the CPU has it) behind numpy's ``Generator`` interface, under fresh
128-bit keys from ``os.urandom`` (the kernel's CSPRNG) that never leave the process:
one key per DP-SGD step for its noise, and one per pass over the data for the Poisson
inclusions of its steps (one counter-mode stream). No torch generator (a Mersenne
Twister on the CPU, seeded with 32 bits; Philox on CUDA) ever holds a secret.

The noise follows Opacus's ``secure_mode`` recipe against the floating-point attacks on
Gaussian samplers (Mironov, CCS 2012; Jin et al., IEEE S&P 2022): each coordinate is the
sum of four independent ``N(0, std**2)`` draws halved (Holohan and Braghin, "Secure
Random Sampling in Differential Privacy", ESORICS 2021, section 5.1, with ``n = 2``),
here drawn and summed in float64 (53-bit precision) and rounded to the parameter's dtype
once. Opacus still clips, sums and accounts; only the source of the noise changes
(:func:`use_secret_noise`).

``DpRandomness(seed=...)`` is the one way to make these draws repeatable: every key is
then derived from the seed (HMAC-SHA256), so anyone who knows the seed can replay the
batches and the noise, and the run's epsilon does not hold. It exists for tests.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import types
from collections.abc import Callable, Iterator, Sized
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate

#: Bytes of fresh key material per stream (AES-128).
KEY_BYTES = 16
#: Standard-normal draws summed per noise coordinate (Opacus's secure_mode: 2n, n = 2).
NOISE_DRAWS = 4
#: From this many noised values per step on, the next step's noise is drawn in a
#: background thread while the current step computes (numpy releases the GIL).
PREFETCH_MIN_VALUES = 1 << 16


@dataclass(frozen=True)
class DpRandomness:
    """Where a client's DP randomness comes from.

    Attributes:
        seed: ``None`` (the default, and the only private choice): every key is
            :data:`KEY_BYTES` fresh bytes from ``os.urandom``. An integer: TESTS ONLY,
            every key is derived from it, so the batches and the noise can be replayed
            by anyone who knows it and no epsilon holds.
        label: What the keys of a seeded instance are derived for (a client, a round).

    """

    seed: int | None = None
    label: str = ""

    @property
    def secret(self) -> bool:
        """Whether every key is fresh from the kernel's CSPRNG."""
        return self.seed is None

    def child(self, *parts: object) -> DpRandomness:
        """The same source for a narrower purpose (its keys are derived apart)."""
        return DpRandomness(self.seed, "/".join([self.label, *(str(p) for p in parts)]))

    def key(self, *parts: object) -> int:
        """A 128-bit key for one stream: fresh, or (seeded) derived from the seed and label."""
        if self.seed is None:
            return int.from_bytes(os.urandom(KEY_BYTES), "little")
        message = "/".join([self.label, *(str(p) for p in parts)]).encode()
        digest = hmac.new(str(self.seed).encode(), message, hashlib.sha256).digest()
        return int.from_bytes(digest[:KEY_BYTES], "little")

    def generator(self, *parts: object) -> np.random.Generator:
        """A numpy generator over AES-128-CTR under :meth:`key`."""
        return aes_generator(self.key(*parts))

    def rekey(self, generator: np.random.Generator, *parts: object) -> np.random.Generator:
        """``generator`` (from :func:`aes_generator`) restarted under :meth:`key`.

        The same stream as a new :meth:`generator` gives, at a quarter of its set-up cost.
        """
        bits: Any = generator.bit_generator  # randomgen's AESCounter: seed(key=...) rekeys
        bits.seed(key=self.key(*parts))
        return generator


def aes_generator(key: int) -> np.random.Generator:
    """A numpy ``Generator`` whose bits are AES-128 in counter mode under ``key``."""
    from randomgen import AESCounter

    return np.random.Generator(AESCounter(key=key))


class SecretPoissonSampler(Sampler[list[int]]):
    """Poisson sampling for DP-SGD with every inclusion drawn from a CSPRNG.

    Each of ``steps`` batches includes every example independently with probability
    ``sample_rate``, like Opacus's ``UniformWithReplacementSampler``. Each pass draws its
    batches' inclusions from one stream under its own fresh key.
    """

    def __init__(
        self, num_samples: int, sample_rate: float, steps: int, randomness: DpRandomness
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.randomness = randomness
        self._passes = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        stream = self.randomness.generator("sample", self._passes)
        self._passes += 1
        for _ in range(self.steps):
            draws = stream.random(self.num_samples)
            yield np.flatnonzero(draws < self.sample_rate).tolist()


def secret_poisson_loader(
    data: Dataset[Any],
    batch_size: int,
    randomness: DpRandomness,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader[Any]:
    """Opacus's Poisson loader for ``data``, with :class:`SecretPoissonSampler` inside.

    As Opacus's ``DPDataLoader.from_data_loader`` does for a loader of batch size ``B``:
    ``L = ceil(n / B)`` batches per pass at sample rate ``1 / L``, and a collate function
    that turns an empty batch into zero-size tensors of the right shapes.
    """
    from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty

    if not isinstance(data, Sized):
        raise ValueError("DP-SGD needs a dataset with a length (Poisson sampling)")
    n = len(data)
    if n < 1:
        raise ValueError("cannot train on an empty dataset")
    batches = math.ceil(n / batch_size)
    first = data[0]
    sampler = SecretPoissonSampler(n, 1.0 / batches, batches, randomness)
    return DataLoader(
        data,
        batch_sampler=sampler,
        collate_fn=wrap_collate_with_empty(
            collate_fn=default_collate if collate_fn is None else collate_fn,
            sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
            dtypes=[dtype_safe(x) for x in first],
        ),
    )


def secure_gaussian(
    generator: np.random.Generator, size: int, std: float
) -> npt.NDArray[np.float64]:
    """``size`` draws of ``N(0, std**2)``, each the halved sum of four (float64)."""
    total = generator.standard_normal(size)
    draw = np.empty(size)
    for _ in range(NOISE_DRAWS - 1):
        generator.standard_normal(out=draw)
        total += draw
    total *= std / math.sqrt(NOISE_DRAWS)
    return total


class SecretNoise:
    """One round's DP-SGD noise: a flat block of ``N(0, std**2)`` values per step.

    Every step's block comes from a stream under its own fresh key. With at least
    :data:`PREFETCH_MIN_VALUES` values a step, the next block is drawn in a background
    thread while the current step computes; at most ``steps`` blocks are ever drawn.
    Call :meth:`close` when the round ends.
    """

    def __init__(self, randomness: DpRandomness, size: int, std: float, steps: int) -> None:
        if size < 0 or steps < 0:
            raise ValueError(f"size and steps must be >= 0, got {size}, {steps}")
        if not (math.isfinite(std) and std >= 0.0):
            raise ValueError(f"std must be finite and >= 0, got {std!r}")
        self.randomness = randomness
        self.size = size
        self.std = std
        self.steps = steps
        self._drawn = 0
        # One bit generator, rekeyed per step, used by one thread at a time.
        self._generator = aes_generator(0)
        self._pool = ThreadPoolExecutor(1) if size >= PREFETCH_MIN_VALUES else None
        self._next: Future[npt.NDArray[np.float64]] | None = None
        self._schedule()

    def _draw(self, index: int) -> npt.NDArray[np.float64]:
        generator = self.randomness.rekey(self._generator, "noise", index)
        return secure_gaussian(generator, self.size, self.std)

    def _schedule(self) -> None:
        if self._pool is not None and self._drawn < self.steps:
            self._next = self._pool.submit(self._draw, self._drawn)
            self._drawn += 1

    def next_block(self) -> npt.NDArray[np.float64]:
        """The next step's noise (drawn now, or taken from the background thread)."""
        if self._next is None:
            block = self._draw(self._drawn)
            self._drawn += 1
            return block
        block = self._next.result()
        self._next = None
        self._schedule()
        return block

    def close(self) -> None:
        """Stop the background thread (a block it is drawing is discarded)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._next = None


def use_secret_noise(optimizer: Any, noise: SecretNoise) -> None:
    """Make an Opacus ``DPOptimizer`` draw its noise from ``noise`` instead of torch.

    Replaces the optimizer's ``add_noise`` (the same contract as Opacus 1.6's
    ``DPOptimizer.add_noise`` and ``DPOptimizerFastGradientClipping.add_noise``: noise
    ``p.summed_grad`` into ``p.grad`` for every parameter). Clipping, scaling and the
    accountant's hook are untouched.

    Raises:
        ValueError: the block size or std does not match the optimizer's.

    """
    size = sum(p.numel() for p in optimizer.params)
    multiplier = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)
    std = float(multiplier) * float(optimizer.max_grad_norm)
    if size != noise.size or not math.isclose(std, noise.std, rel_tol=1e-12, abs_tol=0.0):
        raise ValueError(
            f"the noise source draws {noise.size} values at std {noise.std:g}, the "
            f"optimizer needs {size} at std {std:g}"
        )
    optimizer.add_noise = types.MethodType(_make_add_noise(noise), optimizer)


def _make_add_noise(noise: SecretNoise) -> Callable[[Any], None]:
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise(self: Any) -> None:
        block = noise.next_block()
        offset = 0
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            count = p.summed_grad.numel()
            part = torch.from_numpy(block[offset : offset + count]).view(p.summed_grad.shape)
            offset += count
            p.grad = (p.summed_grad + part.to(p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)

    return add_noise
