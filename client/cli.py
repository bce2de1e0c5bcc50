"""``sepals-client``: join a deployed federation with an edge app given by module path.

Example::

    sepals-client --bundle ~/fl/clients/client-1 \
        --app examples/edge_app.py:make_app --app-arg partition=0 --app-arg partitions=3

Exit codes: 0 done, 2 bad arguments, app, bundle, file permissions or a ledger in use by
another process, 3 the server cannot be reached (within ``--connect-timeout``) or the
connection failed, 4 the server refused this node. Every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from sepals.client.edge import EdgeClient, FederationConnectionError, NodeRefusedError
from sepals.client.edge_app import load_edge_app
from sepals.common.errors import SepalsError
from sepals.common.log import configure_cli_logging, quiet_libraries


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.replace("-", "_"), value


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sepals-client``."""
    parser = argparse.ArgumentParser(
        prog="sepals-client",
        description="Join a sepals federation: DP-SGD locally, encrypted updates out.",
    )
    parser.add_argument("--bundle", type=Path, required=True, help="client bundle directory")
    parser.add_argument(
        "--app",
        required=True,
        help="module:attr or file.py:attr naming an EdgeApp or a function returning one",
    )
    parser.add_argument(
        "--app-arg", type=_kv, action="append", default=[], help="KEY=VALUE for the app function"
    )
    parser.add_argument("--ledger", type=Path, help="ledger file (default <bundle>/ledger.json)")
    parser.add_argument("--server", help="override the bundle's HOST:PORT")
    parser.add_argument("--insecure", action="store_true", help="no TLS (local trials only)")
    parser.add_argument("--max-tasks", type=int, help="exit after serving this many tasks")
    parser.add_argument(
        "--activation-timeout",
        type=float,
        default=150.0,
        help="seconds to keep retrying while the server refuses this node (default 150)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_positive,
        default=60.0,
        help="seconds to wait for the server to answer before giving up (default 60)",
    )
    parser.add_argument(
        "--allow-insecure-permissions",
        action="store_true",
        help="accept secret files other users can read (trials only)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    configure_cli_logging(args.verbose)
    quiet_libraries()  # before the app loads its libraries
    if args.allow_insecure_permissions:
        print(
            "sepals-client: WARNING: --allow-insecure-permissions: secret files readable by "
            "other users are accepted; use it for trials only",
            file=sys.stderr,
        )
    try:
        app = load_edge_app(args.app, dict(args.app_arg))
        client = EdgeClient(
            args.bundle,
            app,
            ledger_path=args.ledger,
            server_address=args.server,
            insecure=args.insecure,
            activation_timeout=args.activation_timeout,
            connect_timeout=args.connect_timeout,
            allow_insecure_permissions=args.allow_insecure_permissions,
        )
    except (ValueError, SepalsError) as exc:
        print(f"sepals-client: {_one_line(exc)}", file=sys.stderr)
        return 2
    try:
        return _serve(client, args.max_tasks)
    finally:
        client.close()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _serve(client: EdgeClient, max_tasks: int | None) -> int:
    """Run the client; map its failures to exit codes 3 and 4, one line each."""

    def _terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        served = client.run(max_tasks=max_tasks)
    except NodeRefusedError as exc:
        print(f"sepals-client: refused: {_one_line(exc)}", file=sys.stderr)
        return 4
    except (FederationConnectionError, SepalsError) as exc:
        print(f"sepals-client: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"sepals-client: served {served} tasks", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
