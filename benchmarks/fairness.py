"""Fairness benchmark: how the final model serves each client, by partition, DP on and off.

Runs the real ``sepals-sim`` job (digits, 10 clients, BFV encryption on, the dataset's
defaults as ``sepals.simulations.defaults.DATASET_DEFAULTS`` gives them) for the partitions
``iid``, ``dirichlet:0.5`` and ``dirichlet:0.1``, each with DP on (the default
epsilon) and off (``--epsilon 0``), and prints one row per run: the global accuracy on
the held-out test split and the spread of the per-client accuracy of the final model on
every client's own test split (min, median, max and the mean of the worst 10%, that
is of ``ceil(10% of clients)`` clients). Under a non-IID partition each client's test
split follows its own train label distribution, so the spread shows which clients the
model serves badly.

The full run takes about 6 x 50 s on 2 cores; ``--quick`` runs 3 rounds per job.

Usage: ``python -m benchmarks.fairness [--quick] [--rounds R] [--seed S]
[--partitions iid,dirichlet:0.5,dirichlet:0.1] [--cpus N] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

DATASET = "digits"
CLIENTS = 10
DEFAULT_PARTITIONS = ("iid", "dirichlet:0.5", "dirichlet:0.1")
QUICK_ROUNDS = 3


@dataclass(frozen=True)
class Row:
    """One run's result (accuracies as fractions; ``None`` when not measured)."""

    partition: str
    dp: bool
    epsilon: float | None
    accuracy: float | None
    client_min: float | None
    client_median: float | None
    client_max: float | None
    worst10: float | None
    clients: int
    seconds: float


HEADER = (
    f"{'partition':<15}{'DP':<12}{'global':>9}{'min':>9}{'median':>9}{'max':>9}"
    f"{'worst10%':>10}{'clients':>9}{'wall s':>8}"
)


def pct(value: float | None) -> str:
    """``91.67%``, or ``n/a`` for ``None``."""
    return "n/a" if value is None else f"{100 * value:.2f}%"


def dp_label(dp: bool, epsilon: float | None) -> str:
    """``eps 7.98`` (the largest epsilon a client reported) with DP, ``off`` without."""
    if not dp:
        return "off"
    return "eps n/a" if epsilon is None else f"eps {epsilon:.2f}"


def format_row(row: Row) -> str:
    """One table line of ``row``."""
    return (
        f"{row.partition:<15}{dp_label(row.dp, row.epsilon):<12}{pct(row.accuracy):>9}"
        f"{pct(row.client_min):>9}{pct(row.client_median):>9}{pct(row.client_max):>9}"
        f"{pct(row.worst10):>10}{row.clients:>9}{row.seconds:>8.0f}"
    )


def row_from_report(report: dict[str, Any], partition: str, dp: bool, seconds: float) -> Row:
    """A table row from a ``sepals-sim`` report (its ``final`` and ``final.fairness``)."""
    final = report["final"]
    fair = final.get("fairness") or {}
    return Row(
        partition=partition,
        dp=dp,
        epsilon=final.get("epsilon"),
        accuracy=final.get("accuracy"),
        client_min=fair.get("min"),
        client_median=fair.get("median"),
        client_max=fair.get("max"),
        worst10=fair.get("worst10_mean"),
        clients=int(fair.get("count", 0)),
        seconds=seconds,
    )


def job_argv(
    partition: str, dp: bool, seed: int, rounds: int | None, cpus: int | None
) -> list[str]:
    """The ``sepals-sim`` flags of one run: every other setting is the job's default."""
    argv = ["--dataset", DATASET, "--clients", str(CLIENTS), "--partition", partition]
    argv += ["--seed", str(seed)]
    if not dp:
        argv += ["--epsilon", "0"]
    if rounds is not None:
        argv += ["--rounds", str(rounds)]
    if cpus is not None:
        argv += ["--cpus", str(cpus)]
    return argv


def measure(
    partition: str, dp: bool, seed: int, rounds: int | None, cpus: int | None, out: str
) -> Row:
    """Run one ``sepals-sim`` job and return its row."""
    from sepals.simulations.cli import build_parser, config_from_args
    from sepals.simulations.harness import run_experiment

    tag = f"{partition.replace(':', '')}_{'dp' if dp else 'nodp'}"
    argv = [*job_argv(partition, dp, seed, rounds, cpus), "--out", os.path.join(out, tag)]
    t0 = time.perf_counter()
    report = run_experiment(config_from_args(build_parser().parse_args(argv)))
    return row_from_report(report, partition, dp, time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; 2 on bad flags, else 0."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--partitions", default=",".join(DEFAULT_PARTITIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=None, help="default: the dataset's")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_ROUNDS} rounds per job (a smoke test)"
    )
    parser.add_argument("--cpus", type=int, default=None, help="CPUs for Ray (default: all)")
    parser.add_argument("--out", default="runs/fairness")
    args = parser.parse_args(argv)
    from sepals.common.partition import PartitionSpec, check_partition

    try:
        if args.quick and args.rounds is not None:
            raise ValueError("give --quick or --rounds, not both")
        if args.rounds is not None and args.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
        partitions = [p.strip() for p in args.partitions.split(",") if p.strip()]
        if not partitions:
            raise ValueError("--partitions must name at least one partition")
        for p in partitions:
            check_partition(DATASET, p)
        partitions = [str(PartitionSpec.parse(p)) for p in partitions]
    except ValueError as exc:
        print(f"benchmarks.fairness: error: {exc}", file=sys.stderr)
        return 2
    rounds = QUICK_ROUNDS if args.quick else args.rounds

    from sepals.simulations.cli import configure_logging
    from sepals.simulations.defaults import DATASET_DEFAULTS
    from sepals.simulations.process_env import apply_process_env

    apply_process_env()
    configure_logging(verbose=False)
    defaults = dict(DATASET_DEFAULTS[DATASET])
    if rounds is not None:
        defaults["rounds"] = rounds
    rows: list[Row] = []
    print(HEADER, flush=True)
    for p in partitions:
        for dp in (True, False):
            rows.append(measure(p, dp, args.seed, rounds, args.cpus, args.out))
            print(format_row(rows[-1]), flush=True)
    print()
    settings = ", ".join(f"{k} {v}" for k, v in defaults.items())
    print(
        f"{DATASET}, {CLIENTS} clients, BFV on, seed {args.seed}, sepals-sim defaults "
        f"({settings}); DP = the default epsilon. Per-client accuracy: the final model on "
        "each client's own test split (non-IID: it follows the client's train labels)."
    )
    print(HEADER)
    for row in rows:
        print(format_row(row))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fairness.json"), "w", encoding="utf-8") as fh:
        json.dump([asdict(r) for r in rows], fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
