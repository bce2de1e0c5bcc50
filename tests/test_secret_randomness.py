"""An attacker who knows every public value cannot predict a client's DP randomness.

Public: the federation seed, client ids, round numbers, dataset sizes, the code. Secret:
which examples each DP-SGD step samples, and the step's noise. Each test is written as
the attacker would write it; the test switch (a seeded ``DpRandomness``) shows that the
same attack succeeds when the randomness is not secret.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any

import numpy as np
import pytest
import torch
from dp_util import plain_plan
from scipy import stats
from torch.utils.data import Dataset

from sepals.client import secret_random
from sepals.client.core import ClientRuntime, SepalsClient
from sepals.client.edge import EdgeClient
from sepals.client.privacy import PrivacyLedger, poisson_schedule
from sepals.client.secret_random import (
    KEY_BYTES,
    DpRandomness,
    SecretNoise,
    aes_generator,
    secure_gaussian,
)
from sepals.client.training import TrainSettings, train_round
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.models import get_flat
from sepals.common.protocol import RoundConfig

N, BATCH, SEED = 400, 40, 0  # q = 1/10, 10 steps a round


class Recorded(Dataset):  # type: ignore[type-arg]
    """Examples ``(x_i, 0)`` that remember which indices each batch fetched."""

    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = torch.zeros(n, dtype=torch.long)
        self.batches: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        self.batches.append(list(indices))
        return [self[i] for i in indices]


def _client(data: Dataset, reproducible_seed: int | None = None) -> tuple[SepalsClient, Any]:  # type: ignore[type-arg]
    plan = dataclasses.replace(plain_plan(10), batch_size=BATCH, model_seed=SEED)
    runtime = ClientRuntime(
        client_id="client-3",
        model_factory=lambda: torch.nn.Linear(4, 2),
        train_data=data,
        test_data=None,
        privacy=PrivacyConfig(target_epsilon=8.0, delta=1e-4),
        encryption=EncryptionConfig(scheme="none"),
        plan=plan,
        reproducible_seed=reproducible_seed,
    )
    return SepalsClient(runtime), plan


def _sampled(reproducible_seed: int | None = None) -> list[list[int]]:
    data = Recorded(N)
    client, plan = _client(data, reproducible_seed)
    client.train(RoundConfig.for_plan(plan, 1), None, PrivacyLedger.empty(client.runtime.privacy))
    return data.batches


def _old_scheme_guess(steps: int) -> list[set[int]]:
    """Replay the batches from SHA-256(seed, client id, round) as a torch generator."""
    digest = hashlib.sha256(f"{SEED}/client-3/1/data".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return [
        set(torch.nonzero(torch.rand(N, generator=gen) < 1 / 10).flatten().tolist())
        for _ in range(steps)
    ]


def _public_seed_guess(seed: int, steps: int) -> list[set[int]]:
    """Replay them with the code's own sampler keyed from the public values."""
    stream = DpRandomness(seed).child("client-3", 1).child("batches").generator("sample", 0)
    return [set(np.flatnonzero(stream.random(N) < 1 / 10).tolist()) for _ in range(steps)]


def _hits(guesses: list[set[int]], actual: list[list[int]]) -> tuple[int, int]:
    return sum(len(g & set(a)) for g, a in zip(guesses, actual, strict=True)), sum(
        len(g) for g in guesses
    )


def test_knowing_every_public_value_predicts_the_batches_no_better_than_chance() -> None:
    actual = _sampled()
    assert len(actual) == 10
    for guesses in (_old_scheme_guess(10), _public_seed_guess(SEED, 10)):
        hits, guessed = _hits(guesses, actual)
        # By chance a guessed example was sampled with probability q = 0.1; the attack
        # that worked on the public seed was right every time.
        chance, sd = 0.1 * guessed, math.sqrt(guessed * 0.1 * 0.9)
        assert hits < chance + 5 * sd, (hits, guessed)


def test_two_runs_with_the_same_seed_sample_different_batches_unless_seeded() -> None:
    first, second = _sampled(), _sampled()
    assert first != second
    seeded_a, seeded_b = _sampled(reproducible_seed=SEED), _sampled(reproducible_seed=SEED)
    assert seeded_a == seeded_b
    # ... and then the attacker who knows the seed replays every batch exactly.
    hits, guessed = _hits(_public_seed_guess(SEED, 10), seeded_a)
    assert hits == guessed == sum(len(b) for b in seeded_a)


def test_poisson_inclusions_are_independent_at_rate_q() -> None:
    sampler = secret_random.SecretPoissonSampler(2000, 0.05, 200, DpRandomness())
    counts = np.zeros(2000)
    sizes = []
    for batch in sampler:
        counts[batch] += 1
        sizes.append(len(batch))
    # batch sizes ~ Binomial(2000, 0.05): mean 100, sd 9.7; per-example counts over the
    # 200 steps ~ Binomial(200, 0.05): mean 10, variance 9.5
    assert abs(np.mean(sizes) - 100) < 5 * 9.75 / math.sqrt(200)
    assert abs(np.std(sizes) - 9.75) < 2.0
    assert abs(counts.mean() - 10) < 0.3 and abs(counts.var() - 9.5) < 1.5


def test_noise_keys_that_differ_only_in_their_high_bits_give_different_noise() -> None:
    key = 5
    other = key + (7 << 100)
    a = aes_generator(key).standard_normal(8)
    b = aes_generator(other).standard_normal(8)
    assert not np.allclose(a, b)
    # What the torch generator did with a 64-bit seed on the CPU: only 32 bits count.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5 + (7 << 32))
    assert torch.equal(
        torch.normal(0, 1, (8,), generator=g1), torch.normal(0, 1, (8,), generator=g2)
    )


def test_every_step_takes_128_fresh_bits_for_its_noise_and_its_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drawn: list[bytes] = []
    real = os.urandom

    def recording(n: int) -> bytes:
        out = real(n)
        drawn.append(out)
        return out

    monkeypatch.setattr(secret_random.os, "urandom", recording)
    data = Recorded(N)
    client, plan = _client(data)
    reply = client.train(
        RoundConfig.for_plan(plan, 1), None, PrivacyLedger.empty(client.runtime.privacy)
    )
    monkeypatch.setattr(secret_random.os, "urandom", real)
    steps = int(reply.metrics["total-steps"])
    keys = [k for k in drawn if len(k) == KEY_BYTES]
    # a key per step for the noise, one for the pass's batches, one for the rounding
    assert steps == 10 and len(keys) >= steps + 2
    assert len(set(keys)) == len(keys) and KEY_BYTES * 8 >= 128


def test_no_torch_generator_samples_or_noises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opacus draws batches with torch.rand and noise with torch.normal: neither runs."""

    def forbidden(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a torch generator was asked for DP randomness")

    monkeypatch.setattr(torch, "rand", forbidden)
    monkeypatch.setattr(torch, "normal", forbidden)
    assert len(_sampled()) == 10


def test_the_noise_is_gaussian_with_std_sigma_c() -> None:
    draws = secure_gaussian(aes_generator(11), 200_000, 2.5)
    assert stats.kstest(draws / 2.5, "norm").pvalue > 1e-3
    assert abs(draws.std() / 2.5 - 1) < 0.01 and abs(draws.mean()) < 0.03


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_dp_sgd_step_adds_exactly_that_noise(mode: str) -> None:
    """Zero gradients, lr 1, no momentum: the step is -N(0, (sigma C)^2) / B per weight."""
    d, k, n = 500, 20, 50
    sigma, clip = 1.3, 0.7
    data = torch.utils.data.TensorDataset(torch.zeros(n, d), torch.zeros(n, dtype=torch.long))

    def factory() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(d, k, bias=False))

    privacy = PrivacyConfig(target_epsilon=1e6, max_grad_norm=clip, noise_multiplier=sigma)
    settings = TrainSettings(batch_size=n, learning_rate=1.0, momentum=0.0, grad_sample_mode=mode)
    ledger = PrivacyLedger.empty(privacy).calibrated(privacy, *poisson_schedule(n, n, 1), 1)
    w0 = get_flat(factory())
    out = train_round(factory, w0, data, settings, privacy, ledger, 1)
    noise = (w0 - out.weights) * n / (sigma * clip)
    assert stats.kstest(noise, "norm").pvalue > 1e-3
    again = train_round(factory, w0, data, settings, privacy, ledger, 1)
    assert not np.allclose(again.weights, out.weights)


def test_a_large_step_draws_its_noise_ahead_and_stops_cleanly() -> None:
    noise = SecretNoise(DpRandomness(1), 1 << 17, 1.0, steps=3)
    blocks = [noise.next_block() for _ in range(3)]
    noise.close()
    assert all(b.shape == (1 << 17,) for b in blocks) and not np.allclose(blocks[0], blocks[1])
    replay = SecretNoise(DpRandomness(1), 1 << 17, 1.0, steps=3)
    assert np.array_equal(replay.next_block(), blocks[0])
    replay.close()


def test_an_edge_client_cannot_be_given_a_seed() -> None:
    import inspect

    assert "seed" not in inspect.signature(EdgeClient).parameters
    assert ClientRuntime.__dataclass_fields__["reproducible_seed"].default is None
