"""The cost of secret DP randomness: sepals' CSPRNG DP-SGD step against Opacus's stock path.

One process times a DP-SGD step with sepals' CSPRNG sampling and noise against the same
step with Opacus's stock torch-generator randomness.

Both arms run the same loop on the same model and data with Opacus 1.6 doing the
per-sample clipping, summing and accounting:

* **stock** (what sepals did before): Opacus's Poisson loader drawing inclusions with
  ``torch.rand`` from a ``torch.Generator``, and Opacus's ``torch.normal`` noise from a
  generator reseeded with 64 bits of ``os.urandom`` before every step;
* **secret** (what every client runs now): :func:`sepals.client.secret_random.secret_poisson_loader`
  and :func:`~sepals.client.secret_random.use_secret_noise`: AES-128-CTR under a fresh
  128-bit key per step, four Gaussian draws per coordinate, the next step's noise drawn
  in a background thread from 65,536 values on.

Rows: an MLP of about 10k and one of about 1M trainable parameters (``--batch`` 16,
the bundled digits job's batch size, one torch thread as a simulated client has).
Repeats alternate the arms. With ``--jobs`` it also runs the two bundled jobs
(``sepals-sim`` and ``sepals-sim --pretrained``, secret randomness as always) and prints
the largest share of each job's wall time the extra cost can take: the extra seconds
per step, measured on a linear model with as many trainable parameters as the job at
its batch size, times every DP-SGD step of every client of the run (as if none ran in
parallel), over the run's wall time.

Usage: ``python -m benchmarks.randomness [--repeats 5] [--steps 30] [--batch 16] [--jobs]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: The bundled jobs ``--jobs`` runs: name and ``sepals-sim`` flags.
JOBS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("digits from scratch", ()),
    ("digits pretrained", ("--pretrained",)),
)


def _mlp(inputs: int, hidden: int, outputs: int = 10) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs))

    return factory


def _linear(inputs: int) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(inputs, 10)

    return factory


def _run_arm(
    factory: Callable[[], nn.Module], data: TensorDataset, batch: int, steps: int, secret: bool
) -> float:
    """Seconds per DP-SGD step of ``steps`` steps (after one warm-up step)."""
    from opacus import PrivacyEngine

    from sepals.client.secret_random import (
        DpRandomness,
        SecretNoise,
        secret_poisson_loader,
        use_secret_noise,
    )

    model = factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = PrivacyEngine(accountant="rdp")
    noise_gen = torch.Generator()
    if secret:
        loader: Any = secret_poisson_loader(data, batch, DpRandomness())
    else:
        loader = DataLoader(data, batch_size=batch, shuffle=True)
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=not secret,
        noise_generator=None if secret else noise_gen,
    )
    noise = None
    if secret:
        size = sum(p.numel() for p in optimizer.params)
        noise = SecretNoise(DpRandomness(), size, 1.0, steps + 1)
        use_secret_noise(optimizer, noise)
    criterion = nn.CrossEntropyLoss()
    done, t0 = 0, 0.0
    try:
        while done <= steps:
            for x, y in loader:
                if done == 1:
                    t0 = time.perf_counter()
                if done > steps:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(x), y) if len(y) else model(x).sum() * 0.0
                loss.backward()
                if not secret:
                    noise_gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
                optimizer.step()
                done += 1
    finally:
        if noise is not None:
            noise.close()
    return (time.perf_counter() - t0) / steps


def _measure(
    factory: Callable[[], nn.Module], inputs: int, n: int, batch: int, steps: int, repeats: int
) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(n, inputs, generator=gen), torch.randint(0, 10, (n,)))
    stock, secret = [], []
    for _ in range(repeats):
        stock.append(_run_arm(factory, data, batch, steps, secret=False))
        secret.append(_run_arm(factory, data, batch, steps, secret=True))
    return statistics.median(stock), statistics.median(secret)


def _job_rows(args: argparse.Namespace) -> None:
    """Run each bundled job and bound the share of its wall time the secret path costs."""
    from benchmarks.acceptance import _run
    from sepals.simulations.cli import configure_logging
    from sepals.simulations.pretrain import DEFAULT_OUT as DEFAULT_CHECKPOINT
    from sepals.simulations.pretrain import pretrain

    configure_logging(verbose=False)
    if not DEFAULT_CHECKPOINT.exists():
        print(f"pretraining the public backbone first ({DEFAULT_CHECKPOINT}, a few minutes)")
        pretrain(seed=0, out_path=DEFAULT_CHECKPOINT)
    for name, flags in JOBS:
        argv = [*flags, str(DEFAULT_CHECKPOINT)] if flags else []
        report = _run(argv, os.path.join(args.out, name.replace(" ", "-")))
        trainable = int(report["config"]["model_parameters"])
        batch = int(report["config"]["federation"]["batch_size"])
        steps = sum(int(c["steps"]) for c in report["clients"])
        wall = float(report["final"]["wall_seconds"])
        inputs = max(1, trainable // 10)
        stock, secret = _measure(_linear(inputs), inputs, 2000, batch, args.steps, args.repeats)
        share = max(secret - stock, 0.0) * steps / wall
        verdict = "met" if share <= 0.05 else "MISSED"
        print(
            f"{name:<28} {trainable:>9,} {1e3 * stock:>9.3f} {1e3 * secret:>10.3f} "
            f"{secret / stock:>5.2f}x  {steps} steps in {wall:.1f} s: wall time "
            f"+{100 * share:.2f}% at most (<= 5%: {verdict})",
            flush=True,
        )


def main() -> None:
    """Print one row per model: step times, the ratio, and the verdict against its target."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", action="store_true", help="also run the two bundled jobs")
    parser.add_argument("--out", default="runs/randomness")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(
        f"DP-SGD step, {args.threads} torch thread(s), median of {args.repeats} "
        f"alternating repeats of {args.steps} steps"
    )
    print(f"{'model':<28} {'params':>9} {'stock ms':>9} {'secret ms':>10} {'ratio':>6}  target")
    for name, inputs, hidden in (("MLP 64-150-10", 64, 150), ("MLP 784-1250-10", 784, 1250)):
        factory = _mlp(inputs, hidden)
        params = sum(p.numel() for p in factory().parameters())
        stock, secret = _measure(factory, inputs, 2000, args.batch, args.steps, args.repeats)
        ratio = secret / stock
        print(
            f"{name:<28} {params:>9,} {1e3 * stock:>9.3f} {1e3 * secret:>10.3f} "
            f"{ratio:>5.2f}x  batch {args.batch}: <= 1.10x: {'met' if ratio <= 1.10 else 'MISSED'}",
            flush=True,
        )
    if args.jobs:
        from sepals.simulations.process_env import apply_process_env

        apply_process_env()
        torch.set_num_threads(args.threads)
        _job_rows(args)


if __name__ == "__main__":
    main()
