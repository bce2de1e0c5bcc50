"""A 1M-parameter model, 10 clients: sepals with BFV encryption against the same run without.

Runs, in this process and one after the other, the same federation twice through
:func:`sepals.simulations.harness.run_experiment` with an own app (an
:class:`~sepals.client.EdgeApp`): a wide MLP on scikit-learn's bundled digits
(64 features -> :data:`HIDDEN` tanh units -> 10 classes, 999,985 parameters), the
digits data split IID among the clients, every client sampled every round.

* ``encrypted``: sepals' default codec, BFV (:class:`~sepals.common.bfv.BfvCodec`,
  the :class:`~sepals.common.config.EncryptionConfig` defaults: N=8192, primes
  [60, 40], a 44-bit plain modulus) with ``max_clients`` the number sampled per round;
* ``plain``: ``scheme="none"`` (plaintext fp32 through the same strategy).

DP-SGD stays ON (epsilon 8, delta 1e-5) in BOTH runs, so that the ratio of their times
isolates the cost of encryption (key provisioning, encrypting every client's update,
the server's validation and additions, the clients' and the evaluator's decryption of
every global model). Targets: the encrypted run takes at most
:data:`TARGET_RATIO` times the plain one. The verdict is printed as ``met`` or
``MISSED``, never asserted. Times are wall-clock seconds of the whole run
(:func:`run_experiment`, start-up included); the rounds alone are reported as well.

Usage: ``python -m benchmarks.million [--rounds R] [--clients N] [--cpus C] [--out DIR]``

Importing this module starts nothing: torch and sepals are imported when a run starts.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from sepals.client.edge_app import EdgeApp

TARGET_RATIO = 1.2
#: ``progress(label, row)``: ``label`` is ``plain`` or ``encrypted``; ``row`` is the
#: harness's start-up row (``round`` 0, ``startup_seconds``) or a round's row.
ProgressFn = Callable[[str, dict[str, Any]], None]
TARGET_PARAMETERS = 1_000_000
IN_FEATURES = 64
NUM_CLASSES = 10
#: Hidden width: 64 * H + H + H * 10 + 10 = 75 H + 10 parameters.
HIDDEN = (TARGET_PARAMETERS - NUM_CLASSES) // (IN_FEATURES + 1 + NUM_CLASSES)
EPSILON = 8.0
BATCH_SIZE = 32
LEARNING_RATE = 0.05


def mlp_parameters(in_features: int, hidden: int, num_classes: int) -> int:
    """Parameters of a one-hidden-layer MLP: weights and biases of both layers."""
    return in_features * hidden + hidden + hidden * num_classes + num_classes


def make_model() -> nn.Module:
    """The benchmark's model: 64 -> :data:`HIDDEN` (tanh) -> 10, about 1M parameters."""
    from sepals.common.models import MLP

    return MLP(IN_FEATURES, NUM_CLASSES, hidden=(HIDDEN,))


def make_app(seed: int | str = 0) -> EdgeApp:
    """The benchmark's app: the wide MLP on digits' train and held-out test splits.

    The split is the one ``sepals-sim --dataset digits`` uses (stratified 80/20,
    ``seed``, an int or, from ``sepals-sim --app benchmarks.million:make_app``, its
    string); the privacy budget is (epsilon 8, delta 1e-5).
    """
    from sepals.client.edge_app import EdgeApp
    from sepals.common.config import PrivacyConfig
    from sepals.common.data import load_dataset

    splits = load_dataset("digits", int(seed))
    return EdgeApp(
        model_factory=make_model,
        train_data=splits.train.to_torch(),
        test_data=splits.test.to_torch(),
        privacy=PrivacyConfig(target_epsilon=EPSILON),
    )


def verdict(ratio: float, target: float = TARGET_RATIO) -> str:
    """``met`` when ``ratio`` is at most ``target``, else ``MISSED``.

    Raises:
        ValueError: ``ratio`` or ``target`` is not a positive finite number.

    """
    for name, value in (("ratio", ratio), ("target", target)):
        if not (value > 0 and value != float("inf")):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return "met" if ratio <= target else "MISSED"


@dataclass(frozen=True)
class RunFigures:
    """What one run measured.

    Attributes:
        seconds: Wall-clock seconds of the whole run, start-up included.
        round_seconds: Seconds of the rounds alone (start-up excluded).
        upload_bytes_per_client: Mean bytes one client uploads in one round.
        accuracy: Final accuracy of the global model on the held-out test split.
        epsilon: Largest epsilon any client spent (``None``: DP off).

    """

    seconds: float
    round_seconds: float
    upload_bytes_per_client: float
    accuracy: float | None
    epsilon: float | None


def figures_of(report: dict[str, Any], seconds: float) -> RunFigures:
    """The figures of one run's ``report`` (as ``run_experiment`` returns it).

    Raises:
        ValueError: no round accepted any client (nothing to measure per client).

    """
    rows = report["rounds"]
    accepted = sum(int(r["clients_accepted"]) for r in rows)
    if accepted == 0:
        raise ValueError("no round accepted any client update; see the run's report.json")
    final = report["final"]
    return RunFigures(
        seconds=seconds,
        round_seconds=float(sum(r["seconds"] for r in rows)),
        upload_bytes_per_client=sum(int(r["upload_bytes"]) for r in rows) / accepted,
        accuracy=final.get("accuracy"),
        epsilon=final.get("epsilon"),
    )


@dataclass(frozen=True)
class MillionResult:
    """The benchmark's figures; both runs keep DP on, so ``ratio`` isolates encryption.

    Attributes:
        parameters: Exact parameter count of the model.
        clients: Clients (all sampled every round).
        rounds: Rounds per run.
        seconds_plain: Whole run without encryption (DP on).
        seconds_encrypted: Whole run with BFV (DP on).
        ratio: ``seconds_encrypted / seconds_plain``.
        round_seconds_plain: The plain run's rounds alone.
        round_seconds_encrypted: The encrypted run's rounds alone.
        upload_bytes_plain: Bytes per client per round, plaintext fp32.
        upload_bytes_encrypted: Bytes per client per round, BFV.
        accuracy_plain: Final held-out accuracy, plain run.
        accuracy_encrypted: Final held-out accuracy, encrypted run.
        epsilon_plain: Largest client epsilon, plain run.
        epsilon_encrypted: Largest client epsilon, encrypted run.

    """

    parameters: int
    clients: int
    rounds: int
    seconds_plain: float
    seconds_encrypted: float
    ratio: float
    round_seconds_plain: float
    round_seconds_encrypted: float
    upload_bytes_plain: float
    upload_bytes_encrypted: float
    accuracy_plain: float | None
    accuracy_encrypted: float | None
    epsilon_plain: float | None
    epsilon_encrypted: float | None

    @property
    def verdict(self) -> str:
        """``met`` or ``MISSED`` against :data:`TARGET_RATIO`."""
        return verdict(self.ratio)


def _run(
    app: EdgeApp,
    *,
    encrypted: bool,
    rounds: int,
    clients: int,
    cpus: int,
    seed: int,
    out: Path,
    progress: ProgressFn | None,
) -> RunFigures:
    from sepals.common.config import EncryptionConfig, PrivacyConfig
    from sepals.common.federation import FederationConfig, sampled_per_round
    from sepals.simulations.config import SimulationConfig
    from sepals.simulations.harness import run_experiment

    sampled = sampled_per_round(clients, 1.0, 1)
    config = SimulationConfig(
        clients=clients,
        partition="iid",
        federation=FederationConfig(
            rounds=rounds,
            fraction_train=1.0,
            min_train_clients=1,
            batch_size=BATCH_SIZE,
            learning_rate=LEARNING_RATE,
            seed=seed,
        ),
        privacy=PrivacyConfig(target_epsilon=EPSILON),
        encryption=EncryptionConfig(scheme="bfv" if encrypted else "none", max_clients=sampled),
        out=str(out),
        cpus=cpus,
        app="benchmarks.million:make_app",
        device="cpu",
    )
    label = "encrypted" if encrypted else "plain"

    def report_row(row: dict[str, Any]) -> None:
        if progress is not None:
            progress(label, row)

    t0 = time.perf_counter()
    report = run_experiment(config, report_row, app=app, on_start=report_row)
    return figures_of(report, time.perf_counter() - t0)


def run_million(
    rounds: int = 3,
    clients: int = 10,
    cpus: int = 2,
    seed: int = 0,
    out: str = "runs/bench-million",
    *,
    progress: ProgressFn | None = None,
) -> MillionResult:
    """Run the plain and the encrypted federation, one after the other, and compare.

    Both runs are identical (model, data split, seed, DP-SGD at epsilon 8) except for
    the codec: ``scheme="none"`` first, then BFV with the default parameters and
    ``max_clients`` set to the clients sampled per round.

    Args:
        rounds: Rounds per run.
        clients: Clients, all sampled every round.
        cpus: CPUs Ray may use.
        seed: Seed of the data split, sampling, batches and the simulated DP noise.
        out: Folder of the two runs' outputs (``plain/`` and ``encrypted/``).
        progress: Called with each run's start-up row and round rows (see
            :data:`ProgressFn`).

    Returns:
        The figures of both runs.

    Raises:
        ValueError: a setting below 1, or a run in which no client update was accepted.

    """
    for name, value in (("rounds", rounds), ("clients", clients), ("cpus", cpus)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    from sepals.common.models import num_parameters
    from sepals.simulations.process_env import apply_process_env

    apply_process_env()
    app = make_app(seed)
    parameters = num_parameters(make_model())
    runs = {
        label: _run(
            app,
            encrypted=label == "encrypted",
            rounds=rounds,
            clients=clients,
            cpus=cpus,
            seed=seed,
            out=Path(out) / label,
            progress=progress,
        )
        for label in ("plain", "encrypted")
    }
    plain, enc = runs["plain"], runs["encrypted"]
    return MillionResult(
        parameters=parameters,
        clients=clients,
        rounds=rounds,
        seconds_plain=plain.seconds,
        seconds_encrypted=enc.seconds,
        ratio=enc.seconds / plain.seconds,
        round_seconds_plain=plain.round_seconds,
        round_seconds_encrypted=enc.round_seconds,
        upload_bytes_plain=plain.upload_bytes_per_client,
        upload_bytes_encrypted=enc.upload_bytes_per_client,
        accuracy_plain=plain.accuracy,
        accuracy_encrypted=enc.accuracy,
        epsilon_plain=plain.epsilon,
        epsilon_encrypted=enc.epsilon,
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _eps(value: float | None) -> str:
    return "off" if value is None else f"{value:.2f}"


def format_result(r: MillionResult) -> str:
    """The lines the CLI prints for ``r``."""
    round_ratio = (
        r.round_seconds_encrypted / r.round_seconds_plain if r.round_seconds_plain > 0 else None
    )
    lines = [
        f"model parameters: {r.parameters:,}; {r.clients} clients, all sampled; "
        f"{r.rounds} rounds; DP on (epsilon {EPSILON:g}) in both runs",
        f"    plain: {r.seconds_plain:7.1f} s (rounds {r.round_seconds_plain:6.1f} s) | "
        f"upload {r.upload_bytes_plain / 1e6:6.2f} MB per client per round | "
        f"accuracy {_pct(r.accuracy_plain)} | epsilon {_eps(r.epsilon_plain)}",
        f"encrypted: {r.seconds_encrypted:7.1f} s (rounds {r.round_seconds_encrypted:6.1f} s) | "
        f"upload {r.upload_bytes_encrypted / 1e6:6.2f} MB per client per round | "
        f"accuracy {_pct(r.accuracy_encrypted)} | epsilon {_eps(r.epsilon_encrypted)}",
        f"upload encrypted/plain {r.upload_bytes_encrypted / r.upload_bytes_plain:.2f}x",
        "rounds alone encrypted/plain " + ("n/a" if round_ratio is None else f"{round_ratio:.2f}x"),
        f"ratio encrypted/plain {r.ratio:.2f}x (target <= {TARGET_RATIO}x): {r.verdict}",
    ]
    return "\n".join(lines)


def format_row(label: str, row: dict[str, Any]) -> str:
    """One progress line: a run's start-up or one of its rounds."""
    if "startup_seconds" in row:
        return f"{label:>9}: start-up {row['startup_seconds']:.1f} s"
    return (
        f"{label:>9}: round {row['round']} {row['seconds']:.1f} s | accuracy "
        f"{_pct(row.get('accuracy'))} | epsilon {_eps(row.get('epsilon'))} | "
        f"{row['clients_accepted']} clients accepted"
    )


def _print_row(label: str, row: dict[str, Any]) -> None:
    print(format_row(label, row), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run both federations and print the comparison."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.million", description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-million")
    p.add_argument("--verbose", action="store_true", help="show sepals' and Flower's log")
    args = p.parse_args(argv)
    for name in ("rounds", "clients", "cpus"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1", file=sys.stderr)
            return 2

    from sepals.simulations.cli import configure_logging

    configure_logging(args.verbose)
    print(
        f"million benchmark: {mlp_parameters(IN_FEATURES, HIDDEN, NUM_CLASSES):,} parameters, "
        f"{args.clients} clients, {args.rounds} rounds, {args.cpus} CPUs",
        flush=True,
    )
    result = run_million(
        rounds=args.rounds,
        clients=args.clients,
        cpus=args.cpus,
        seed=args.seed,
        out=args.out,
        progress=_print_row,
    )
    print(format_result(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
