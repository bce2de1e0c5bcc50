"""Built-in datasets benchmark: non-private and epsilon 8 accuracy against the majority class.

For every bundled dataset (``digits``, ``breast_cancer``, ``mnist5k``) and partition
(``iid``, ``dirichlet:0.5``), runs the real ``sepals-sim`` job (Flower simulation, BFV
encryption on, 10 clients, the dataset's defaults from ``DATASET_DEFAULTS``) twice:

1. non-private: ``--epsilon 0`` (plain SGD, still encrypted);
2. private: ``--epsilon 8`` (DP-SGD, delta 1e-5, the RDP accountant).

and prints one row per (dataset, partition): the majority-class rate of the held-out
test split, both accuracies, the largest epsilon any client reported, and whether the
non-private accuracy is *clearly above* the majority-class rate: at least
:data:`CLEAR_MARGIN` (10 points) above it. A missed target is printed as ``MISSED``,
never asserted.

Every job uses the dataset's own ``sepals-sim`` defaults, except the rounds given by
``--rounds D=R`` (none by default). The default run takes about 14 minutes on 2 cores.

Usage: ``python -m benchmarks.datasets [--datasets digits,breast_cancer,mnist5k]
[--partitions iid,dirichlet:0.5] [--seed S] [--rounds D=R ...] [--cpus N] [--out DIR]``
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

import numpy as np
import numpy.typing as npt

CLEAR_MARGIN = 0.10
"""Non-private accuracy must reach majority rate + this (10 points) to count as clearly above."""
CLIENTS = 10
DP_EPSILON = 8.0
DEFAULT_DATASETS = ("digits", "breast_cancer", "mnist5k")
DEFAULT_PARTITIONS = ("iid", "dirichlet:0.5")


def majority_rate(labels: npt.NDArray[np.integer[Any]]) -> float:
    """Share of the most frequent class in ``labels`` (the majority-class classifier's accuracy).

    Raises:
        ValueError: ``labels`` is empty or holds a negative label.

    """
    y = np.asarray(labels)
    if y.size == 0:
        raise ValueError("majority_rate needs at least one label")
    if (y < 0).any():
        raise ValueError("labels must be non-negative class indices")
    return float(np.bincount(y.ravel()).max() / y.size)


def clearly_above(accuracy: float, majority: float, margin: float = CLEAR_MARGIN) -> bool:
    """Whether ``accuracy`` is at least ``margin`` above the majority-class rate."""
    return accuracy >= majority + margin - 1e-12


def verdict(accuracy: float | None, majority: float, margin: float = CLEAR_MARGIN) -> str:
    """``met`` when ``accuracy`` is clearly above ``majority``, else ``MISSED`` (also for n/a)."""
    if accuracy is None or not clearly_above(accuracy, majority, margin):
        return "MISSED"
    return "met"


def parse_rounds(items: Sequence[str]) -> dict[str, int]:
    """``["mnist5k=10", ...]`` as ``{"mnist5k": 10}``.

    Raises:
        ValueError: an item is not ``DATASET=ROUNDS`` with ROUNDS >= 1.

    """
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            rounds = int(value)
        except ValueError:
            rounds = 0
        if not sep or not name.strip() or rounds < 1:
            raise ValueError(f"--rounds must be DATASET=ROUNDS with ROUNDS >= 1, got {item!r}")
        out[name.strip()] = rounds
    return out


@dataclass(frozen=True)
class Row:
    """One (dataset, partition) result."""

    dataset: str
    partition: str
    rounds: int
    majority: float
    non_private: float | None
    private: float | None
    epsilon: float | None
    seconds: float

    @property
    def verdict(self) -> str:
        """``met`` or ``MISSED`` (see :func:`verdict`)."""
        return verdict(self.non_private, self.majority)


HEADER = (
    f"{'dataset':<14}{'partition':<15}{'rounds':>6}{'majority':>10}{'non-private':>13}"
    f"{'eps=8 acc':>11}{'epsilon':>9}{'wall s':>8}  non-private >= majority + 10 pts"
)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def format_row(row: Row) -> str:
    """One table line of ``row``."""
    eps = "n/a" if row.epsilon is None else f"{row.epsilon:.3f}"
    return (
        f"{row.dataset:<14}{row.partition:<15}{row.rounds:>6}{_pct(row.majority):>10}"
        f"{_pct(row.non_private):>13}{_pct(row.private):>11}{eps:>9}{row.seconds:>8.0f}  "
        f"{row.verdict}"
    )


def _run(argv: list[str], out: str) -> dict[str, Any]:
    from sepals.simulations.cli import build_parser, config_from_args
    from sepals.simulations.harness import run_experiment

    config = config_from_args(build_parser().parse_args([*argv, "--out", out]))
    return run_experiment(config)


def measure(
    dataset: str, partition: str, seed: int, rounds: int | None, cpus: int | None, out: str
) -> Row:
    """Run the non-private and the epsilon 8 job of one (dataset, partition)."""
    from sepals.common.data import load_dataset
    from sepals.simulations.defaults import DATASET_DEFAULTS

    t0 = time.perf_counter()
    common = ["--dataset", dataset, "--partition", partition, "--clients", str(CLIENTS)]
    common += ["--seed", str(seed)]
    if rounds is not None:
        common += ["--rounds", str(rounds)]
    if cpus is not None:
        common += ["--cpus", str(cpus)]
    tag = f"{dataset}_{partition.replace(':', '')}"
    plain = _run([*common, "--epsilon", "0"], os.path.join(out, f"{tag}_nondp"))
    private = _run([*common, "--epsilon", str(DP_EPSILON)], os.path.join(out, f"{tag}_eps8"))
    return Row(
        dataset=dataset,
        partition=partition,
        rounds=rounds if rounds is not None else int(DATASET_DEFAULTS[dataset]["rounds"]),
        majority=majority_rate(load_dataset(dataset, seed).test.y),
        non_private=plain["final"]["accuracy"],
        private=private["final"]["accuracy"],
        epsilon=private["final"]["epsilon"],
        seconds=time.perf_counter() - t0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its table; 2 on bad flags, else 0 (targets are printed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DEFAULT_DATASETS))
    parser.add_argument("--partitions", default=",".join(DEFAULT_PARTITIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds", action="append", default=[], help="DATASET=ROUNDS (default: its own)"
    )
    parser.add_argument("--cpus", type=int, default=None, help="CPUs for Ray (default: all)")
    parser.add_argument("--out", default="runs/datasets")
    args = parser.parse_args(argv)
    from sepals.common.data import DATASET_NAMES
    from sepals.common.partition import PartitionSpec, check_partition

    try:
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
        partitions = [p.strip() for p in args.partitions.split(",") if p.strip()]
        for d in datasets:
            if d not in DATASET_NAMES:
                raise ValueError(f"unknown dataset {d!r}; choose from {', '.join(DATASET_NAMES)}")
            for p in partitions:
                check_partition(d, p)
        partitions = [str(PartitionSpec.parse(p)) for p in partitions]
        rounds = parse_rounds(args.rounds)
        unknown = sorted(set(rounds) - set(datasets))
        if unknown:
            raise ValueError(f"--rounds names datasets not benchmarked: {', '.join(unknown)}")
        if not datasets or not partitions:
            raise ValueError("--datasets and --partitions must name at least one each")
    except ValueError as exc:
        print(f"benchmarks.datasets: error: {exc}", file=sys.stderr)
        return 2

    from sepals.simulations.cli import configure_logging
    from sepals.simulations.process_env import apply_process_env

    apply_process_env()
    configure_logging(verbose=False)
    rows: list[Row] = []
    for d in datasets:
        for p in partitions:
            rows.append(measure(d, p, args.seed, rounds.get(d), args.cpus, args.out))
            print(format_row(rows[-1]), flush=True)
    print()
    print(f"{CLIENTS} clients, BFV on, seed {args.seed}, defaults of sepals-sim")
    print(HEADER)
    for row in rows:
        print(format_row(row))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "datasets.json"), "w", encoding="utf-8") as fh:
        json.dump([{**asdict(r), "verdict": r.verdict} for r in rows], fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
