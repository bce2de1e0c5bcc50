"""Private federated explanations against the central non-private ones, in one invocation.

Run: ``python -m benchmarks.explain [--seeds 10] [--quick] [--out runs/bench-explain]``.
Every simulation runs the real path (``sepals-sim --explain``: Ray clients, BFV, masks
for training, the explanation round after it) and its evaluator computes the central,
non-private explanation of the same final model: the baseline, in the same run.

* **planted**: a generated table of 50 standard-normal features whose label depends on
  5 of them (a random set and random signs per seed); 10 clients, training at epsilon 8
  in total of which the explanation takes 1. Target: the private federated attribution
  ranks the 5 in its top 5 in at least 9 of 10 seeds.
* **fidelity**: digits with the public-pretraining job (``sepals-sim --pretrained``),
  explanation epsilon 1. Target: every class's private map has cosine similarity
  >= 0.9 with the central non-private map of the same model.
* **accounting**: every client's total epsilon (training plus explanation) in its
  ledger file against an independent recomputation with dp-accounting's PLD accountant
  (events composed here, not by sepals), and against its budget.
* **cost**: the default job (``sepals-sim --explain``): the explanation round's time
  against a training round's (median). Target: at most one training round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from benchmarks.finetune import ensure_checkpoint
from sepals.client.edge_app import EdgeApp
from sepals.client.privacy import PrivacyLedger
from sepals.common.config import PrivacyConfig
from sepals.common.explain_plot import importance
from sepals.common.models import MLP
from sepals.simulations.api import simulate

FEATURES, PLANTED, CLASSES = 50, 5, 2
TRAIN, TEST = 3000, 1000


def planted_model() -> MLP:
    """The planted table's model: one hidden layer of 16 tanh units."""
    return MLP(FEATURES, CLASSES, hidden=(16,))


def planted_app(seed: int) -> tuple[EdgeApp, list[int]]:
    """A table whose label is the sign of a signed sum of 5 of its 50 features."""
    rng = np.random.default_rng(seed)
    chosen = sorted(int(j) for j in rng.choice(FEATURES, PLANTED, replace=False))
    signs = rng.choice([-1.0, 1.0], PLANTED)
    x = rng.normal(size=(TRAIN + TEST, FEATURES)).astype(np.float32)
    y = (x[:, chosen] @ signs + 0.3 * rng.normal(size=TRAIN + TEST) > 0).astype(np.int64)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    app = EdgeApp(
        model_factory=planted_model,
        train_data=TensorDataset(tx[:TRAIN], ty[:TRAIN]),
        test_data=TensorDataset(tx[TRAIN:], ty[TRAIN:]),
        privacy=PrivacyConfig(target_epsilon=8.0),
    )
    return app, chosen


def top(mean: Any, k: int) -> list[int]:
    """The ``k`` most important features of a ``(targets, features)`` map."""
    return sorted(int(j) for j in np.argsort(-importance(np.asarray(mean)))[:k])


def run_planted(seeds: int, out: Path, rounds: int) -> dict[str, Any]:
    """The planted-features figure over ``seeds`` seeds."""
    hits_private = hits_central = 0
    runs = []
    for seed in range(seeds):
        app, chosen = planted_app(seed)
        folder = out / f"planted-{seed}"
        result = simulate(
            app,
            clients=10,
            rounds=rounds,
            epsilon=8.0,
            learning_rate=0.2,
            batch_size=32,
            seed=seed,
            out=folder,
            explain={"epsilon": 1.0},
            print_progress=False,
        )
        doc = json.loads((folder / "explanation.json").read_text())
        private, central = (
            top(doc["private"]["mean"], PLANTED),
            top(doc["central"]["mean"], PLANTED),
        )
        hits_private += private == chosen
        hits_central += central == chosen
        runs.append(
            {
                "seed": seed,
                "planted": chosen,
                "private_top5": private,
                "central_top5": central,
                "accuracy": result.report["final"]["accuracy"],
            }
        )
        print(
            f"  planted seed {seed}: planted {chosen} private top 5 {private} central "
            f"{central} accuracy {result.report['final']['accuracy']:.3f}",
            flush=True,
        )
    return {
        "private_hits": hits_private,
        "central_hits": hits_central,
        "seeds": seeds,
        "runs": runs,
    }


def sim(argv: list[str], out: Path) -> dict[str, Any]:
    """Run ``sepals-sim`` with ``argv`` into ``out``; return its report."""
    command = [sys.executable, "-m", "sepals.simulations.cli", *argv, "--out", str(out)]
    print("  $ sepals-sim " + " ".join([*argv, "--out", str(out)]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text())  # type: ignore[no-any-return]


def run_fidelity(out: Path, checkpoint: Path, epsilon: float) -> dict[str, Any]:
    """Per-class cosine of the private and central maps on the pretrained digits job."""
    argv = ["--pretrained", str(checkpoint), "--explain", "--explain-epsilon", f"{epsilon:g}"]
    report = sim(argv, out)
    cos = report["explanation"]["cosine_to_central"]
    return {
        "per_class": cos["per_target"],
        "min": cos["min"],
        "mean": cos["mean"],
        "report": report,
    }


def independent_epsilon(history: list[list[float]], delta: float) -> float:
    """Epsilon of a ledger's history, composed here with dp-accounting's PLD accountant."""
    import dp_accounting as dpa
    from dp_accounting.pld import pld_privacy_accountant

    events = [
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(s)), int(n))
        if q < 1.0
        else dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(s), int(n))
        for s, q, n in history
    ]
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    return float(accountant.compose(dpa.ComposedDpEvent(events)).get_epsilon(delta))


def run_accounting(folders: list[Path], budget: float) -> dict[str, Any]:
    """Every ledger of ``folders``: reported total against the recomputation and budget."""
    worst_gap, worst_total, count, with_release = 0.0, 0.0, 0, 0
    for folder in folders:
        for path in sorted((folder / "ledgers").glob("*.json")):
            ledger = PrivacyLedger.load(path, PrivacyConfig(target_epsilon=budget))
            if ledger.epsilon is None:
                continue
            recomputed = independent_epsilon([list(h) for h in ledger.history], ledger.delta)
            worst_gap = max(worst_gap, abs(ledger.epsilon - recomputed))
            worst_total = max(worst_total, ledger.epsilon)
            count += 1
            with_release += bool(ledger.explanations)
    return {
        "ledgers": count,
        "with_release": with_release,
        "max_gap": worst_gap,
        "max_total": worst_total,
        "budget": budget,
    }


def run_cost(out: Path) -> dict[str, Any]:
    """The default job with --explain: the explanation round against a training round."""
    report = sim(["--explain"], out)
    rounds = [r["seconds"] for r in report["rounds"][1:]]  # round 1 also calibrates sigma
    median = statistics.median(rounds)
    seconds = report["explanation"]["seconds"]
    return {"explain": seconds, "round_median": median, "ratio": seconds / median}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.explain")
    parser.add_argument("--seeds", type=int, default=10, help="planted-feature seeds (10)")
    parser.add_argument("--rounds", type=int, default=10, help="training rounds, planted (10)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-explain"))
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/pretrained/digits-cnn.pt"))
    parser.add_argument("--skip", nargs="*", default=[], help="planted fidelity cost")
    parser.add_argument(
        "--fidelity-epsilons",
        type=float,
        nargs="+",
        default=[1.0, 2.0],
        help="explanation epsilons of the fidelity runs (1 is the target's; default 1 2)",
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows: list[tuple[str, str, str, str]] = []
    folders: list[Path] = []
    if "planted" not in args.skip:
        planted = run_planted(args.seeds, args.out, args.rounds)
        folders += [args.out / f"planted-{s}" for s in range(args.seeds)]
        rows.append(
            (
                "planted: 5 of 50 in top 5 (10 clients, eps_e 1)",
                f"{planted['private_hits']}/{planted['seeds']} seeds",
                f"{planted['central_hits']}/{planted['seeds']} seeds",
                "PASS" if planted["private_hits"] >= 0.9 * planted["seeds"] else "MISSED",
            )
        )
    for epsilon in [] if "fidelity" in args.skip else args.fidelity_epsilons:
        folder = args.out / f"fidelity-{epsilon:g}"
        fidelity = run_fidelity(folder, ensure_checkpoint(args.checkpoint), epsilon)
        folders.append(folder)
        verdict = "PASS" if fidelity["min"] >= 0.9 else "MISSED"
        rows.append(
            (
                f"fidelity: per-class cosine, pretrained digits, eps_e {epsilon:g}",
                f"min {fidelity['min']:.3f} mean {fidelity['mean']:.3f}",
                "1.000 (the reference)",
                verdict if epsilon == 1.0 else f"({verdict} at this eps)",
            )
        )
    if "cost" not in args.skip:
        cost = run_cost(args.out / "cost")
        folders.append(args.out / "cost")
        rows.append(
            (
                "cost: explanation round / training round, default job",
                f"{cost['explain']:.2f} s / {cost['round_median']:.2f} s = {cost['ratio']:.2f}x",
                f"{cost['round_median']:.2f} s (a training round)",
                "PASS" if cost["ratio"] <= 1.0 else "MISSED",
            )
        )
    if folders:
        acc = run_accounting(folders, 8.0)
        rows.append(
            (
                f"accounting: {acc['ledgers']} ledgers ({acc['with_release']} with a release)",
                f"max |eps - recomputed| {acc['max_gap']:.4f}, max eps {acc['max_total']:.3f}",
                f"budget {acc['budget']:g}",
                "PASS" if acc["max_gap"] <= 0.02 and acc["max_total"] <= 8.0 else "MISSED",
            )
        )
    print(f"\nexplanation benchmark ({time.perf_counter() - t0:.0f} s)")
    print(f"{'figure':56} | {'private federated':38} | {'non-private baseline':26} | target")
    for name, private, baseline, verdict in rows:
        print(f"{name:56} | {private:38} | {baseline:26} | {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
