"""1,000 clients: sepals' private, encrypted simulation against the same run in the clear.

Runs, in this process and one after the other, the same federation twice through
:func:`sepals.simulations.harness.run_experiment`:

* ``private``: DP-SGD (epsilon 8, delta 1e-5) and the BFV codec, whose ``max_clients``
  is the number sampled per round;
* ``plain``: DP off and encryption off (plaintext fp32 through the same strategy).

Default federation: ``synthetic:1,1``, 1,000 clients, 10% (100) sampled per round, 20
rounds, 2 CPUs. It prints each run's whole time, the ratio, sepals' overhead per
sampled client per round (``(t_private - t_plain) / (rounds * sampled)``) and the peak
resident memory of the whole process tree (this process, Ray and its workers and the
evaluator), sampled every 0.2 s from ``/proc``. Targets:
whole run <= 180 s, ratio <= 1.3, overhead <= 20 ms, peak RSS <= 6 GB; each is printed
as met or MISSED, never asserted.

Usage: ``python -m benchmarks.scale [--clients N] [--fraction F] [--rounds R] [--cpus C]
[--dataset NAME] [--out DIR] [--only plain|private] [--million-rounds R] [--verbose]``

After the two 1,000-client runs it runs :func:`benchmarks.million.run_million`: a
1M-parameter model, 10 clients, encryption on against off (DP on in both), target
<= 1.2x, printed the same way (``--million-rounds 0`` skips it).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGET_SECONDS = 180.0
TARGET_RATIO = 1.3
TARGET_OVERHEAD_MS = 20.0
TARGET_RSS_GB = 6.0


def _children(pid: int, parents: dict[int, int]) -> set[int]:
    tree = {pid}
    grew = True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in tree and child not in tree:
                tree.add(child)
                grew = True
    return tree


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants (Linux ``/proc``)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces or parentheses
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    total = 0
    for pid in _children(root, parents):
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


class PeakRss:
    """Samples the process tree's resident memory in a thread; keeps the peak."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        root = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(root))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class RunResult:
    """What one run measured."""

    label: str
    seconds: float
    peak_rss: int
    accuracy: float | None
    epsilon: float | None


def _config(args: argparse.Namespace, private: bool, out: Path) -> Any:
    from sepals.common.config import EncryptionConfig, PrivacyConfig
    from sepals.common.federation import FederationConfig, sampled_per_round
    from sepals.simulations.config import SimulationConfig

    federation = FederationConfig(
        rounds=args.rounds,
        fraction_train=args.fraction,
        min_train_clients=1,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
    )
    per_round = sampled_per_round(args.clients, args.fraction, 1)
    return SimulationConfig(
        dataset=args.dataset,
        clients=args.clients,
        partition="iid",
        federation=federation,
        privacy=PrivacyConfig(target_epsilon=8.0 if private else None),
        encryption=EncryptionConfig(scheme="bfv" if private else "none", max_clients=per_round),
        out=str(out),
        cpus=args.cpus,
    )


def run_one(args: argparse.Namespace, private: bool) -> RunResult:
    """Run one federation and measure it."""
    from sepals.simulations.harness import run_experiment

    label = "private" if private else "plain"
    config = _config(args, private, Path(args.out) / label)
    with PeakRss() as rss:
        t0 = time.perf_counter()
        report = run_experiment(config)
        seconds = time.perf_counter() - t0
    final = report["final"]
    return RunResult(label, seconds, rss.peak, final.get("accuracy"), final.get("epsilon"))


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    """Entry point: run both federations and print the comparison."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__)
    p.add_argument("--dataset", default="synthetic:1,1")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None, help="default: the dataset's")
    p.add_argument("--lr", type=float, default=None, help="default: the dataset's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-scale")
    p.add_argument(
        "--only",
        choices=("plain", "private"),
        help="run one of the two federations (for profiling; prints no comparison)",
    )
    p.add_argument(
        "--million-rounds",
        type=int,
        default=3,
        help="rounds of the 1M-parameter comparison (benchmarks.million); 0 skips it",
    )
    p.add_argument("--verbose", action="store_true", help="show sepals' and Flower's log")
    args = p.parse_args(argv)
    from sepals.simulations.defaults import DATASET_DEFAULTS

    defaults = DATASET_DEFAULTS[args.dataset.split(":", 1)[0]]
    if args.batch_size is None:
        args.batch_size = defaults["batch_size"]
    if args.lr is None:
        args.lr = defaults["lr"]

    from sepals.common.federation import sampled_per_round
    from sepals.simulations.cli import configure_logging
    from sepals.simulations.process_env import apply_process_env

    apply_process_env()
    configure_logging(args.verbose)
    sampled = sampled_per_round(args.clients, args.fraction, 1)
    print(
        f"scale benchmark: {args.dataset}, {args.clients} clients, {sampled} per round, "
        f"{args.rounds} rounds, {args.cpus} CPUs",
        flush=True,
    )
    kinds = {"plain": [False], "private": [True], None: [False, True]}[args.only]
    results = [run_one(args, private=private) for private in kinds]
    _report_scale(args, sampled, results)
    if args.million_rounds > 0 and args.only is None:
        from benchmarks.million import format_result, run_million

        print(
            f"1M-parameter model, 10 clients, {args.million_rounds} rounds: encryption on "
            "against off, DP on in both (benchmarks.million)",
            flush=True,
        )
        million = run_million(
            rounds=args.million_rounds,
            clients=10,
            cpus=args.cpus,
            seed=args.seed,
            out=str(Path(args.out) / "million"),
        )
        print(format_result(million), flush=True)
    return 0


def _report_scale(args: argparse.Namespace, sampled: int, results: list[RunResult]) -> None:
    """Print each 1,000-client run and, with both, the comparison against the targets."""
    for r in results:
        acc = "n/a" if r.accuracy is None else f"{100 * r.accuracy:.2f}%"
        eps = "off" if r.epsilon is None else f"{r.epsilon:.2f}"
        print(
            f"{r.label:>8}: {r.seconds:7.1f} s | peak RSS {r.peak_rss / 1e9:5.2f} GB | "
            f"accuracy {acc} | epsilon {eps}",
            flush=True,
        )
    if len(results) == 1:
        return
    plain, private = results
    ratio = private.seconds / plain.seconds
    overhead_ms = 1e3 * (private.seconds - plain.seconds) / (args.rounds * sampled)
    peak_gb = max(r.peak_rss for r in results) / 1e9
    print(
        f"whole private run {private.seconds:.1f} s (target <= {TARGET_SECONDS:.0f} s): "
        f"{_verdict(private.seconds <= TARGET_SECONDS)}"
    )
    print(
        f"ratio private/plain {ratio:.2f}x (target <= {TARGET_RATIO}x): "
        f"{_verdict(ratio <= TARGET_RATIO)}"
    )
    print(
        f"overhead per sampled client per round {overhead_ms:.1f} ms (target <= "
        f"{TARGET_OVERHEAD_MS:.0f} ms): {_verdict(overhead_ms <= TARGET_OVERHEAD_MS)}"
    )
    print(
        f"peak RSS of the process tree {peak_gb:.2f} GB (target <= {TARGET_RSS_GB:.0f} GB): "
        f"{_verdict(peak_gb <= TARGET_RSS_GB)}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
