"""``sepals-sim``: a private, encrypted federated simulation on bundled data.

Run ``sepals-sim --help`` for the flags. Defaults: digits, 10 clients, IID, DP-SGD with
epsilon 8 and delta 1e-5, encryption on with the compact BFV codec.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sepals-sim``."""
    p = argparse.ArgumentParser(
        prog="sepals-sim",
        description="Federated training with DP-SGD (Opacus) and homomorphically encrypted "
        "aggregation (SEAL BFV or CKKS via TenSEAL) on Flower's simulation engine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=["digits", "breast_cancer", "mnist5k"], default="digits")
    p.add_argument("--clients", type=int, default=10, help="number of simulated clients")
    p.add_argument(
        "--rounds", type=int, default=None, help="federated rounds (default per dataset)"
    )
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of clients per round")
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards:K")
    p.add_argument("--epsilon", type=float, default=8.0, help="per-client epsilon; 0 turns DP off")
    p.add_argument("--delta", type=float, default=1e-5, help="per-client delta")
    p.add_argument("--max-grad-norm", type=float, default=None, help="DP clipping norm C")
    p.add_argument("--accountant", choices=["rdp", "prv", "gdp"], default="rdp")
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="local SGD learning rate")
    p.add_argument(
        "--fraction-evaluate",
        type=float,
        default=0.0,
        help="fraction of clients doing federated evaluation each round",
    )
    p.add_argument(
        "--scheme",
        choices=["bfv", "ckks"],
        default="bfv",
        help="HE codec: bfv (quantized, packed, seeded; default) or ckks (the earlier codec)",
    )
    p.add_argument("--no-encryption", action="store_true", help="send plaintext fp32 updates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/latest", help="output folder")
    p.add_argument("--cpus", type=int, default=None, help="CPUs for Ray (default: all)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Flower's own logs")
    return p


# Tuned defaults per dataset (used where a flag is not given).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"rounds": 30, "local_epochs": 1, "batch_size": 16, "lr": 0.2, "max_grad_norm": 1.0},
    "breast_cancer": {
        "rounds": 20,
        "local_epochs": 1,
        "batch_size": 16,
        "lr": 0.05,
        "max_grad_norm": 1.0,
    },
    "mnist5k": {"rounds": 20, "local_epochs": 1, "batch_size": 32, "lr": 0.1, "max_grad_norm": 1.0},
}


def config_from_args(args: argparse.Namespace) -> Any:
    """Turn parsed flags into a :class:`SimulationConfig` (raises ValueError on bad input)."""
    from sepals.common.config import (
        EncryptionConfig,
        FederationConfig,
        PrivacyConfig,
        sampled_per_round,
    )
    from sepals.simulations.harness import SimulationConfig

    d = DATASET_DEFAULTS[args.dataset]

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return d[name] if value is None else value

    if args.epsilon < 0:
        raise ValueError(f"--epsilon must be >= 0 (0 turns DP off), got {args.epsilon}")
    federation = FederationConfig(
        rounds=pick("rounds"),
        fraction_train=args.fraction,
        min_train_clients=1,
        fraction_evaluate=args.fraction_evaluate,
        local_epochs=pick("local_epochs"),
        batch_size=pick("batch_size"),
        learning_rate=pick("lr"),
        seed=args.seed,
    )
    privacy = PrivacyConfig(
        target_epsilon=args.epsilon if args.epsilon > 0 else None,
        delta=args.delta,
        max_grad_norm=pick("max_grad_norm"),
        accountant=args.accountant,
    )
    # An aggregate holds at most the clients sampled in one round (not the federation's
    # size): the BFV grid is as fine as that bound allows.
    encryption = EncryptionConfig(
        scheme="none" if args.no_encryption else args.scheme,
        max_clients=sampled_per_round(max(args.clients, 1), federation.fraction_train, 1),
    )
    return SimulationConfig(
        dataset=args.dataset,
        clients=args.clients,
        partition=args.partition,
        federation=federation,
        privacy=privacy,
        encryption=encryption,
        out=args.out,
        cpus=args.cpus,
    )


def _progress_line(row: dict[str, Any], rounds: int) -> None:
    eps = row["epsilon"]
    qerr = row.get("quant_error")
    extra = ""
    if row["clients_declined"] or row["clients_excluded"]:
        extra = f" | declined {row['clients_declined']} excluded {row['clients_excluded']}"
    print(
        f"round {row['round']:>3}/{rounds} | acc {100 * row['accuracy']:6.2f}% | "
        f"loss {row['loss']:.4f} | eps {'  off' if eps is None else f'{eps:5.2f}'} | "
        f"up {row['upload_bytes'] / 1e3:8.1f} kB | down {row['download_bytes'] / 1e3:8.1f} kB | "
        f"{row['seconds']:5.2f} s | {row.get('codec', '?')} q-err "
        f"{'n/a' if qerr is None else f'{qerr:.1e}'}{extra}",
        flush=True,
    )


def configure_logging(verbose: bool) -> None:
    """Give the ``sepals`` logger a stderr handler (once) and quiet Flower unless verbose."""
    sepals_logger = logging.getLogger("sepals")
    if not sepals_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        sepals_logger.addHandler(handler)
    sepals_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    sepals_logger.propagate = False
    import flwr.common.logger  # noqa: F401 - sets up Flower's logger, which we then quiet

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sepals-sim``."""
    args = build_parser().parse_args(argv)
    # Must precede every flwr import: Flower reads the telemetry switch at import time.
    from sepals.simulations.harness import apply_process_env

    apply_process_env()
    configure_logging(args.verbose)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"sepals-sim: error: {exc}", file=sys.stderr)
        return 2
    from sepals.simulations.harness import run_experiment, summarize

    fed = config.federation
    pc = config.privacy
    dp = f"eps={pc.target_epsilon:g} delta={pc.delta:g}" if pc.enabled else "off"
    print(
        f"sepals-sim: {config.dataset}, {config.clients} clients, {config.partition}, "
        f"{fed.rounds} rounds, DP {dp}, encryption {config.encryption.scheme}; "
        f"output in {os.path.abspath(config.out)}",
        flush=True,
    )
    report = run_experiment(config, progress=lambda row: _progress_line(row, fed.rounds))
    print(summarize(report), flush=True)
    print(f"report: {os.path.join(os.path.abspath(config.out), 'report.json')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
