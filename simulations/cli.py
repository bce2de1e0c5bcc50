"""``sepals-sim``: a private, encrypted federated simulation on bundled data or your app.

Run ``sepals-sim --help`` for the flags. Defaults: digits, 10 clients, IID, DP-SGD with
epsilon 8 and delta 1e-5, encryption on with the compact BFV codec. ``--app
module:attr`` (or ``file.py:attr``) simulates your own :class:`sepals.client.EdgeApp`
instead, the same object a deployed client passes to ``join_federation``.

Exit codes: 0 done, 1 no round aggregated any update, 2 bad flags or app.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sepals.common.config import (
    ACCOUNTANTS,
    DEFAULT_UPDATE_BOUND,
    EncryptionConfig,
    PrivacyConfig,
)
from sepals.common.data import check_dataset_name
from sepals.common.errors import ModelCompatibilityError
from sepals.common.explain_spec import DEFAULT_FEDERATED_METHOD, METHODS, ExplanationSpec
from sepals.common.federation import FederationConfig, sampled_per_round
from sepals.common.log import show_flower_once
from sepals.simulations.config import SimulationConfig, absolute_spec
from sepals.simulations.defaults import (
    APP_DEFAULTS,
    DATASET_DEFAULTS,
    PRETRAINED_DEFAULTS,
    default_lr,
)
from sepals.simulations.pretrain import DEFAULT_OUT as DEFAULT_CHECKPOINT
from sepals.simulations.pretrain import pretrain
from sepals.simulations.process_env import apply_process_env
from sepals.simulations.progress import progress_line, start_line, started_line
from sepals.simulations.report import explanation_line, summarize


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sepals-sim``."""
    p = argparse.ArgumentParser(
        prog="sepals-sim",
        description="Federated training with DP-SGD (Opacus) and homomorphically encrypted "
        "aggregation (SEAL BFV or CKKS via TenSEAL) on Flower's simulation engine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        default="digits",
        help="digits (default), breast_cancer, mnist5k or synthetic:ALPHA,BETA (the "
        "synthetic federated data of Li et al., one natural split per client)",
    )
    p.add_argument(
        "--app",
        default=None,
        help="simulate your own EdgeApp: module:attr or path/to/file.py:attr (replaces "
        "--dataset; its train data is split with --partition)",
    )
    p.add_argument(
        "--app-arg",
        action="append",
        default=[],
        metavar="K=V",
        help="a string argument of the --app factory (repeatable)",
    )
    p.add_argument(
        "--pretrained",
        nargs="?",
        const=str(DEFAULT_CHECKPOINT),
        default=None,
        metavar="PATH",
        help="start from a pretrained checkpoint: with --dataset digits, the "
        "public-pretraining job (alone, the flag uses the checkpoint of 'sepals pretrain', "
        f"{DEFAULT_CHECKPOINT}, and makes it first if missing: public MNIST only, no "
        "privacy cost); with --app, replaces the app's checkpoint",
    )
    p.add_argument(
        "--trainable",
        default=None,
        metavar="PATTERNS",
        help="comma-separated parameter-name patterns to fine-tune, e.g. 'head.*' (the rest "
        "stays frozen and is never sent; default: the job's or the app's choice)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where clients train: auto = the app's choice, else CUDA when present",
    )
    p.add_argument("--clients", type=int, default=10, help="number of simulated clients")
    p.add_argument(
        "--rounds", type=int, default=None, help="federated rounds (default per dataset)"
    )
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of clients per round")
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards:K")
    p.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="per-client epsilon; 0 turns DP off (default 8, or the --app's own budget)",
    )
    p.add_argument(
        "--delta", type=float, default=None, help="per-client delta (default 1e-5 or the app's)"
    )
    p.add_argument("--max-grad-norm", type=float, default=None, help="DP clipping norm C")
    p.add_argument(
        "--accountant",
        choices=list(ACCOUNTANTS),
        default=None,
        help="default pld for digits, breast_cancer and mnist5k, rdp for synthetic (cheaper "
        "for a thousand clients of different sizes), or the app's",
    )
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="local SGD learning rate")
    p.add_argument(
        "--insecure-reproducible",
        action="store_true",
        help="TESTS ONLY: derive the DP sampling, noise and rounding from --seed so that a "
        "run repeats exactly; anyone who knows the seed can replay them, so the reported "
        "epsilon does NOT hold (default: fresh keys from the kernel's CSPRNG every step)",
    )
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
    p.add_argument(
        "--update-bound",
        type=float,
        default=DEFAULT_UPDATE_BOUND,
        metavar="B",
        help="BFV: largest change of one weight from the initial model an update carries; "
        "larger changes are clamped and reported, and the grid step is B over the levels "
        f"each client gets (default {DEFAULT_UPDATE_BOUND:g})",
    )
    p.add_argument(
        "--no-masking",
        action="store_true",
        help="BFV without pairwise masks (for comparison; masks are on by default with BFV)",
    )
    p.add_argument(
        "--mask-neighbours",
        type=int,
        default=None,
        help="masking graph degree k (default: 2*ceil(1.5*log2 n), every other client up to ~24)",
    )
    p.add_argument(
        "--mask-threshold",
        type=int,
        default=None,
        help="masking Shamir threshold T (default: floor(2k/3)+1)",
    )
    p.add_argument(
        "--noise-shares",
        type=int,
        default=1,
        metavar="M",
        help="kept for plans that name it: needs masking with threshold T >= M, but every "
        "client still adds its whole noise and reports its own lone-update epsilon (split "
        "noise has no proof for multi-step DP-SGD; see docs/privacy.md#distributed-noise)",
    )
    p.add_argument(
        "--audit",
        type=int,
        default=None,
        metavar="M",
        help="privacy audit: train once with M white-box gradient canaries and report the "
        "empirical epsilon lower bound (95%% confidence) beside the claimed epsilon "
        "(see the README, 'Privacy audit'; e.g. 300)",
    )
    p.add_argument(
        "--explain",
        nargs="?",
        const=DEFAULT_FEDERATED_METHOD,
        default=None,
        metavar="METHOD",
        help="after training, a private federated explanation round (each client's "
        "attributions clipped, noised and summed under encryption) and a central one for "
        "comparison, into the run folder; METHOD: "
        + ", ".join(METHODS)
        + f" (default {DEFAULT_FEDERATED_METHOD}; see docs/explain.md)",
    )
    p.add_argument(
        "--explain-epsilon",
        type=float,
        default=1.0,
        help="what the explanation costs each client, out of its --epsilon (default 1)",
    )
    p.add_argument(
        "--explain-clip",
        type=float,
        default=1.0,
        help="L2 norm each example's attribution vector is clipped to (default 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/latest", help="output folder")
    p.add_argument("--cpus", type=int, default=None, help="CPUs for Ray (default: all)")
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="HOST:PORT",
        help="run the clients on an existing Ray cluster (its head's address; run "
        "sepals-sim on a cluster node, with --out on a filesystem every node mounts)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show Flower's own logs")
    return p


def parse_app_args(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``["K=V", ...]`` as pairs (raises ValueError on an item without ``=``)."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--app-arg must be KEY=VALUE, got {item!r}")
        pairs.append((key.strip(), value))
    return tuple(pairs)


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    """Turn parsed flags into a :class:`SimulationConfig` (raises ValueError on bad input)."""
    app_args = parse_app_args(args.app_arg)
    if app_args and args.app is None:
        raise ValueError("--app-arg needs --app")
    base = PrivacyConfig(target_epsilon=8.0, delta=1e-5)
    if args.app is not None:
        # The SDK (and Flower with it) loads only when an app is named.
        from sepals.client.edge_app import load_edge_app

        base = load_edge_app(absolute_spec(args.app), dict(app_args)).privacy
        d = {**APP_DEFAULTS, "max_grad_norm": base.max_grad_norm}
    elif args.pretrained is not None:
        # The pretraining jobs (and Flower with them) load only for --pretrained.
        from sepals.simulations.jobs import PRETRAINED_DATASETS

        if args.dataset not in PRETRAINED_DATASETS:
            raise ValueError(
                f"--pretrained with a bundled dataset needs one with a pretraining job "
                f"({', '.join(PRETRAINED_DATASETS)}), not {args.dataset!r}; or bring --app"
            )
        d = PRETRAINED_DEFAULTS[args.dataset]
        base = replace(base, accountant=d["accountant"])
    else:
        name = check_dataset_name(args.dataset)
        d = DATASET_DEFAULTS[name.split(":", 1)[0]]
        base = replace(base, accountant=d["accountant"])

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return d[name] if value is None else value

    if args.epsilon is not None and args.epsilon < 0:
        raise ValueError(f"--epsilon must be >= 0 (0 turns DP off), got {args.epsilon}")
    if args.epsilon is None:
        epsilon = base.target_epsilon
    else:
        epsilon = args.epsilon if args.epsilon > 0 else None
    federation = FederationConfig(
        rounds=pick("rounds"),
        fraction_train=args.fraction,
        min_train_clients=1,
        fraction_evaluate=args.fraction_evaluate,
        local_epochs=pick("local_epochs"),
        batch_size=pick("batch_size"),
        learning_rate=default_lr(d, epsilon) if args.lr is None else args.lr,
        seed=args.seed,
        explanation=None
        if args.explain is None
        else ExplanationSpec(args.explain_epsilon, args.explain_clip, args.explain),
    )
    privacy = PrivacyConfig(
        target_epsilon=epsilon,
        delta=base.delta if args.delta is None else args.delta,
        max_grad_norm=pick("max_grad_norm"),
        accountant=base.accountant if args.accountant is None else args.accountant,
        noise_multiplier=base.noise_multiplier if args.epsilon is None else None,
    )
    # An aggregate holds at most the clients sampled in one round (not the federation's
    # size): the BFV grid is as fine as that bound allows.
    encryption = EncryptionConfig(
        scheme="none" if args.no_encryption else args.scheme,
        max_clients=sampled_per_round(max(args.clients, 1), federation.fraction_train, 1),
        update_bound=args.update_bound,
    )
    tuned = args.mask_neighbours is not None or args.mask_threshold is not None
    if tuned and (args.no_masking or encryption.scheme != "bfv"):
        raise ValueError("--mask-neighbours and --mask-threshold need masking on and BFV")
    if args.noise_shares != 1 and (args.no_masking or encryption.scheme != "bfv"):
        raise ValueError("--noise-shares needs pairwise masking (BFV, without --no-masking)")
    if args.noise_shares != 1 and not privacy.enabled:
        raise ValueError("--noise-shares is about DP noise: it needs DP on (--epsilon > 0)")
    if tuned or args.noise_shares != 1:
        # Masking's key agreement loads only when masking is tuned.
        from sepals.common.masking import masked_federation

        sampled = sampled_per_round(max(args.clients, 1), federation.fraction_train, 1)
        federation = masked_federation(
            federation, sampled, args.mask_neighbours, args.mask_threshold, args.noise_shares
        )
    return SimulationConfig(
        dataset=args.dataset,
        clients=args.clients,
        partition=args.partition,
        masking=not args.no_masking,
        federation=federation,
        privacy=privacy,
        encryption=encryption,
        out=args.out,
        cpus=args.cpus,
        ray_address=args.ray_address,
        app=args.app,
        app_args=app_args,
        device=args.device,
        pretrained=args.pretrained,
        trainable=_patterns(args.trainable),
        insecure_reproducible=args.insecure_reproducible,
    )


def _patterns(text: str | None) -> tuple[str, ...] | None:
    """``--trainable``'s comma-separated patterns (``None`` when not given)."""
    if text is None:
        return None
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    if not patterns:
        raise ValueError("--trainable needs at least one parameter-name pattern, e.g. 'head.*'")
    return patterns


def configure_logging(verbose: bool) -> None:
    """Give the ``sepals`` logger a stderr handler (once) and quiet Flower unless verbose."""
    sepals_logger = logging.getLogger("sepals")
    if not sepals_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        sepals_logger.addHandler(handler)
    sepals_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    sepals_logger.propagate = False
    show_flower_once(logging.DEBUG if verbose else logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sepals-sim``."""
    args = build_parser().parse_args(argv)
    # Telemetry off and the hub offline, here and in every process the run starts.
    apply_process_env()
    configure_logging(args.verbose)
    if args.pretrained == str(DEFAULT_CHECKPOINT) and not DEFAULT_CHECKPOINT.exists():
        print(
            f"pretraining the public backbone into {DEFAULT_CHECKPOINT} (public MNIST only: "
            "no client data, no privacy cost)",
            flush=True,
        )
        pretrain(seed=0, out_path=DEFAULT_CHECKPOINT, progress=lambda line: print(line, flush=True))
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"sepals-sim: error: {exc}".replace("\n", " "), file=sys.stderr)
        return 2
    # Flower and the harness load once the flags are checked: bad flags fail fast.
    from sepals.simulations.harness import run_experiment

    if args.audit is not None and args.audit < 2:
        print(
            f"sepals-sim: error: --audit needs M >= 2 canaries, got {args.audit}", file=sys.stderr
        )
        return 2
    if args.audit is not None and not config.privacy.enabled:
        print(
            "sepals-sim: error: --audit checks a DP claim: it needs --epsilon > 0", file=sys.stderr
        )
        return 2

    fed = config.federation
    print(start_line(config), flush=True)
    metric = ["accuracy"]

    def started(info: dict[str, Any]) -> None:
        print(started_line(info, metric[0]), flush=True)

    if config.app is not None:
        # The SDK loads only when an app is named.
        from sepals.client.edge_app import load_edge_app

        metric[0] = load_edge_app(absolute_spec(config.app), dict(config.app_args)).metric_name
    try:
        run: Any = run_experiment
        if args.audit is not None:
            # The audit loads only for --audit.
            from sepals.simulations.audit import run_audit

            run = functools.partial(run_audit, canaries=args.audit)
        report = run(
            config,
            progress=lambda row: progress_line(
                row, fed.rounds, metric[0], private=config.privacy.enabled
            ),
            on_start=started,
        )
    except (ValueError, ModelCompatibilityError) as exc:
        print(f"sepals-sim: error: {exc}".replace("\n", " "), file=sys.stderr)
        return 2
    print(summarize(report), flush=True)
    if "audit" in report:
        from sepals.simulations.audit import summarize_audit  # only for --audit

        print(summarize_audit(report), flush=True)
    if "explanation" in report:
        print(explanation_line(report["explanation"]), flush=True)
    out = os.path.abspath(config.out)
    print(f"report: {os.path.join(out, 'report.json')}", flush=True)
    if report.get("explanation", {}).get("files"):
        print(f"explanation plot: {os.path.join(out, 'explanation.png')}", flush=True)
    if report["final"].get("model"):
        rebuild = report["config"]["model"].get("rebuild")
        print(
            f"model: {os.path.join(out, report['final']['model'])}"
            + (f" ({rebuild})" if rebuild else ""),
            flush=True,
        )
    if not report["final"].get("aggregated_rounds"):
        print(
            f"sepals-sim: error: no round aggregated any update ({fed.rounds} rounds); "
            "see the excluded and declined clients in the report",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
