"""Acceptance benchmark: the default job against its baselines, in one process.

Runs, after an untimed one-round warm-up (imports, first Ray start):

1. the default job: DP (epsilon 8, delta 1e-5) with encryption (the BFV codec);
2. the same with ``--no-encryption`` (same seed);
3. the non-private baseline: ``--epsilon 0 --no-encryption``;
4. with ``--with-ckks``, the default job with the earlier CKKS codec.

and prints accuracy, wall time and the target ratios, plus an epsilon audit
(every client's epsilon recomputed from its reported sigma, q and steps). With
``--repeats R`` the encrypted and plaintext DP jobs run R times each, alternately, and
the fastest run of each is compared (the runs are seeded: accuracy is identical across
repeats, the wall time is not, on a shared machine).

Usage: ``python -m benchmarks.acceptance [--rounds R] [--seed S] [--repeats R]
[--with-ckks] [--out DIR]``
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def _run(argv: list[str], out: str) -> dict[str, Any]:
    from sepals.simulations.cli import build_parser, config_from_args
    from sepals.simulations.harness import run_experiment

    config = config_from_args(build_parser().parse_args([*argv, "--out", out]))
    return run_experiment(config)


def _epsilon_audit(report: dict[str, Any]) -> tuple[float, float]:
    """Largest client epsilon and largest |reported - recomputed| over the clients."""
    from sepals.client.privacy import compute_epsilon

    worst, largest = 0.0, 0.0
    for c in report["clients"]:
        again = compute_epsilon(
            c["accountant"],
            ((c["noise_multiplier"], c["sample_rate"], c["steps"]),),
            report["config"]["privacy"]["delta"],
        )
        worst = max(worst, abs(again - c["epsilon"]))
        largest = max(largest, c["epsilon"])
    return largest, worst


def main() -> None:
    """Run the three jobs and print the acceptance figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/acceptance")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each DP job")
    parser.add_argument("--with-ckks", action="store_true", help="also run the CKKS codec")
    args = parser.parse_args()
    from sepals.simulations.cli import configure_logging
    from sepals.simulations.process_env import apply_process_env

    apply_process_env()
    configure_logging(verbose=False)
    common = ["--seed", str(args.seed)]
    if args.rounds is not None:
        common += ["--rounds", str(args.rounds)]
    _run([*common, "--rounds", "1"], os.path.join(args.out, "warmup"))
    enc_runs: list[dict[str, Any]] = []
    dp_runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        enc_runs.append(_run(common, os.path.join(args.out, f"dp_bfv_{rep}")))
        dp_runs.append(
            _run([*common, "--no-encryption"], os.path.join(args.out, f"dp_plain_{rep}"))
        )

    def fastest(reports: list[dict[str, Any]]) -> dict[str, Any]:
        return min(reports, key=lambda r: float(r["final"]["wall_seconds"]))

    runs = {
        "dp+bfv (default)": fastest(enc_runs),
        "dp, no encryption": fastest(dp_runs),
        "non-private, no encryption": _run(
            [*common, "--epsilon", "0", "--no-encryption"], os.path.join(args.out, "nodp_plain")
        ),
    }
    if args.with_ckks:
        runs["dp+ckks (earlier codec)"] = _run(
            [*common, "--scheme", "ckks"], os.path.join(args.out, "dp_ckks")
        )
    print(f"{'run':<28} {'accuracy':>9} {'epsilon':>8} {'wall s':>8} {'up MB':>7} {'down MB':>8}")
    for name, report in runs.items():
        f = report["final"]
        eps = "off" if f["epsilon"] is None else f"{f['epsilon']:.3f}"
        print(
            f"{name:<28} {100 * f['accuracy']:8.2f}% {eps:>8} {f['wall_seconds']:8.1f} "
            f"{f['upload_bytes'] / 1e6:7.2f} {f['download_bytes'] / 1e6:8.2f}"
        )
    if args.repeats > 1:
        walls = ", ".join(
            f"{r['final']['wall_seconds']:.1f}/{p['final']['wall_seconds']:.1f}"
            for r, p in zip(enc_runs, dp_runs, strict=True)
        )
        print(f"all repeats, encrypted/plaintext wall s: {walls}")
    enc, dp, base = (
        runs["dp+bfv (default)"],
        runs["dp, no encryption"],
        runs["non-private, no encryption"],
    )
    acc_gap = 100 * abs(enc["final"]["accuracy"] - dp["final"]["accuracy"])
    print(f"accuracy gap, encrypted vs plaintext: {acc_gap:.2f} points (target <= 0.5)")
    print(
        f"codec {enc['final']['codec']}: largest per-round quantization error bound "
        f"{enc['final']['max_quant_error']:.2e}"
    )
    ratio = dp["final"]["wall_seconds"] / base["final"]["wall_seconds"]
    print(f"wall time, DP / non-private (both plaintext): {ratio:.2f}x (target <= 3)")
    ratio = enc["final"]["wall_seconds"] / dp["final"]["wall_seconds"]
    print(f"wall time, encrypted / plaintext (both DP): {ratio:.2f}x (target <= 1.2)")
    largest, worst = _epsilon_audit(enc)
    target = enc["config"]["privacy"]["target_epsilon"]
    print(
        f"epsilon audit: largest client epsilon {largest:.4f} (target {target:g}); "
        f"largest |reported - recomputed| {worst:.2e}"
    )
    print(
        f"default accuracy {100 * enc['final']['accuracy']:.2f}% (target >= 90%); "
        f"non-private {100 * base['final']['accuracy']:.2f}% (target >= 95%)"
    )


if __name__ == "__main__":
    main()
