"""The privacy audit's requirements, measured at the default job.

Runs :func:`sepals.simulations.audit.run_audit` on the default ``sepals-sim`` job
(digits, 10 clients, IID, 30 rounds, its tuned batch size, learning rate and clipping
norm, BFV encryption with masking unless ``--no-encryption``):

* (a) honest runs at epsilon 1 and 8, over ``--seeds`` seeds each: neither the one-run
  bound eps_lb nor the one-shot estimate may exceed the claimed epsilon;
* (b) deliberately broken runs (test-only switch: sigma calibrated and the budget
  claimed, but no noise added) claiming epsilon 2, over the same seeds: the audit must
  refute every one, which only the proven bound does (eps_lb above 2; with 300 canaries
  eps_lb cannot exceed about 3.7, so a broken claim of 8 can only be flagged by the
  one-shot estimate, which is not a proof);
* (c) one audit must take at most 10 minutes on this machine (``--cpus``, default 2).

It prints one row per audit (seed, claimed eps, eps_lb, one-shot estimate, r, correct,
seconds) and a PASS/MISS verdict per requirement. Encryption is post-processing of the clients'
DP-SGD outputs, so ``--no-encryption`` audits the same mechanism, faster.

Usage: ``python -m benchmarks.audit [--seeds 5] [--canaries M] [--no-encryption]
[--skip-broken]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any

TIME_LIMIT_SECONDS = 600.0
BROKEN_CLAIM = 2.0


def _config(epsilon: float, seed: int, out: str, cpus: int, encryption: bool) -> Any:
    from sepals.simulations.cli import build_parser, config_from_args

    argv = ["--epsilon", str(epsilon), "--seed", str(seed), "--out", out, "--cpus", str(cpus)]
    if not encryption:
        argv.append("--no-encryption")
    return config_from_args(build_parser().parse_args(argv))


def _audit(
    epsilon: float, seed: int, canaries: int, cpus: int, encryption: bool, broken: bool
) -> dict[str, Any]:
    from sepals.simulations.audit import run_audit

    with tempfile.TemporaryDirectory(prefix="sepals-audit-") as out:
        t0 = time.perf_counter()
        report = run_audit(
            _config(epsilon, seed, out, cpus, encryption),
            canaries,
            _broken_no_noise_for_tests=broken,
        )
        seconds = time.perf_counter() - t0
    a = report["audit"]
    row = {
        "kind": "broken" if broken else "honest",
        "seed": seed,
        "target_epsilon": epsilon,
        "claimed_epsilon": a["claimed_epsilon"],
        "epsilon_lower_bound": a["epsilon_lower_bound"],
        "one_shot_epsilon": a["one_shot_epsilon"],
        "refuted": a["refuted"],
        "estimate_exceeds_claim": a["estimate_exceeds_claim"],
        "guesses": a["guesses"],
        "correct": a["correct"],
        "canaries": a["canaries"],
        "accuracy": report["final"]["accuracy"],
        "seconds": seconds,
    }
    print(
        f"{row['kind']:>6} | seed {seed} | claimed eps {row['claimed_epsilon']:6.3f} | "
        f"eps_lb {row['epsilon_lower_bound']:6.3f} | one-shot {row['one_shot_epsilon']:7.3f} | "
        f"r {row['guesses']:4d} | correct "
        f"{row['correct']:4d} | acc {100 * (row['accuracy'] or 0):5.1f}% | "
        f"{seconds:6.1f} s",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.audit``."""
    from sepals.simulations.audit import DEFAULT_CANARIES
    from sepals.simulations.cli import configure_logging

    p = argparse.ArgumentParser(prog="python -m benchmarks.audit", description=__doc__)
    p.add_argument("--seeds", type=int, default=5, help="honest seeds per epsilon")
    p.add_argument("--canaries", type=int, default=DEFAULT_CANARIES)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--no-encryption", action="store_true", help="plaintext aggregation")
    p.add_argument("--skip-broken", action="store_true", help="honest runs only: no (b)")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON to PATH")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.canaries < 2 or args.cpus < 1:
        print(
            "benchmarks.audit: error: need --seeds >= 1, --canaries >= 2, --cpus >= 1",
            file=sys.stderr,
        )
        return 2
    configure_logging(False)
    enc = not args.no_encryption
    print(
        f"privacy audit, default job (digits, 10 clients, 30 rounds), m={args.canaries} "
        f"canaries, encryption {'on' if enc else 'off'}, {args.cpus} cpus",
        flush=True,
    )
    rows = []
    for seed in range(args.seeds):
        if not args.skip_broken:
            rows.append(_audit(BROKEN_CLAIM, seed, args.canaries, args.cpus, enc, broken=True))
        for eps in (1.0, 8.0):
            rows.append(_audit(eps, seed, args.canaries, args.cpus, enc, broken=False))
    honest = [r for r in rows if r["kind"] == "honest"]
    broken = [r for r in rows if r["kind"] == "broken"]
    a_ok = not any(r["refuted"] or r["estimate_exceeds_claim"] for r in honest)
    b_ok = bool(broken) and all(r["refuted"] for r in broken)
    slowest = max(r["seconds"] for r in rows)
    c_ok = slowest <= TIME_LIMIT_SECONDS
    worst = max(
        max(r["epsilon_lower_bound"], r["one_shot_epsilon"]) / r["claimed_epsilon"]
        for r in honest
    )
    print(
        f"(a) honest runs: no claim refuted over {len(honest)} runs (largest bound or "
        f"estimate / claim {worst:.3f}): {'PASS' if a_ok else 'MISS'}"
    )
    if broken:
        lowest = min(r["epsilon_lower_bound"] for r in broken)
        print(
            f"(b) broken runs claiming eps {BROKEN_CLAIM:g}: {sum(r['refuted'] for r in broken)}"
            f" of {len(broken)} refuted by the proven bound (lowest eps_lb {lowest:.3f}; "
            f"one-shot estimate above the claim in "
            f"{sum(r['estimate_exceeds_claim'] for r in broken)}): {'PASS' if b_ok else 'MISS'}"
        )
    else:
        print("(b) broken runs: not run (--skip-broken)")
    print(
        f"(c) slowest audit {slowest:.1f} s <= {TIME_LIMIT_SECONDS:.0f} s on {args.cpus} cpus: "
        f"{'PASS' if c_ok else 'MISS'}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0 if (a_ok and (b_ok or args.skip_broken) and c_ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
