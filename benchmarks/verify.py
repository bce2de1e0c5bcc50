"""The cost of checking a sum before it is adopted, at 1M parameters, in one process.

Every client decrypts the global model each round anyway; the check
(:meth:`sepals.common.bfv.BfvCodec.decode_aggregate`: every packed field within what the
round's updates can sum to) is the only extra work on that path. The verification stage
adds one more decryption on the critical path of a round (its verifiers decrypt in
parallel). Both are printed against one round of a client at the same size: DP-SGD
training of an MLP of about 1M parameters on ``--examples`` examples (one local epoch,
batch 16) plus encoding its update.

Rows (median of ``--repeats``): decode; decode with the check (target: the check adds
at most 5% of a round); a client's round; and the verification stage's decryption as a
share of that round.

Usage: ``python -m benchmarks.verify [--repeats 3] [--examples 600]``
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

LENGTH_HIDDEN = 1250  # 784 * 1250 + 1250 + 1250 * 10 + 10 = 993,760 parameters


def _median(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    """Print the check's and the verification stage's cost against a round."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=600)
    parser.add_argument("--clients", type=int, default=10, help="summands of the sum")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    from sepals.client.privacy import PrivacyLedger, poisson_schedule
    from sepals.client.training import TrainSettings, train_round
    from sepals.common.bfv import BfvCodec
    from sepals.common.config import EncryptionConfig, PrivacyConfig
    from sepals.common.seal_bundle import generate_bfv_bundle, public_bfv_bundle

    def factory() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(784, LENGTH_HIDDEN), nn.Tanh(), nn.Linear(LENGTH_HIDDEN, 10))

    length = sum(p.numel() for p in factory().parameters())
    config = EncryptionConfig(max_clients=args.clients).sized_for(length)
    bundle = generate_bfv_bundle(config)
    client = BfvCodec.for_client(bundle, config)
    server = BfvCodec.for_server(public_bfv_bundle(bundle), config)
    rng = np.random.default_rng(0)
    payloads = [client.encode(rng.uniform(-0.5, 0.5, length)) for _ in range(args.clients)]
    total = server.aggregate(payloads, length)

    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(args.examples, 784, generator=gen), torch.randint(0, 10, (args.examples,))
    )
    privacy = PrivacyConfig(target_epsilon=8.0, noise_multiplier=1.0)
    settings = TrainSettings(batch_size=16, learning_rate=0.1)
    ledger = PrivacyLedger.empty(privacy).calibrated(
        privacy, *poisson_schedule(args.examples, 16, 1), 1
    )

    def one_round() -> None:
        out = train_round(factory, None, data, settings, privacy, ledger, 1)
        client.encode(np.clip(out.weights, -1, 1))

    decode = _median(lambda: client.decode(total), args.repeats)
    checked = _median(lambda: client.decode_aggregate(total, args.clients), args.repeats)
    round_seconds = _median(one_round, args.repeats)
    check = max(checked - decode, 0.0)
    print(
        f"1M-parameter sum of {args.clients} updates ({length:,} values), median of {args.repeats}"
    )
    print(f"  decode                      {decode:8.3f} s")
    print(f"  decode with the range check {checked:8.3f} s")
    print(f"  a client's DP round + encode {round_seconds:7.3f} s ({args.examples} examples)")
    verdict = "met" if check <= 0.05 * round_seconds else "MISSED"
    share = 100 * check / round_seconds
    print(f"  the check: +{check:.3f} s = {share:.2f}% of a round (<= 5%: {verdict})")
    print(
        f"  the verification stage's decryption: {checked:.3f} s = "
        f"{100 * checked / round_seconds:.1f}% of a round (on its critical path; the "
        "verifiers decrypt in parallel, plus one message exchange)"
    )


if __name__ == "__main__":
    main()
