"""``sepals-client``: join a deployed federation with an edge app given by module path.

Example::

    sepals-client --bundle bundles/clients/client-1 \
        --app examples/edge_app.py:make_app --app-arg partition=0 --app-arg partitions=3
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from sepals.client.edge import (
    EdgeClient,
    FederationConnectionError,
    NodeRefusedError,
    load_edge_app,
)
from sepals.common.errors import SepalsError
from sepals.common.log import configure_cli_logging


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
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    configure_cli_logging(args.verbose)
    try:
        app = load_edge_app(args.app, dict(args.app_arg))
        client = EdgeClient(
            args.bundle,
            app,
            ledger_path=args.ledger,
            server_address=args.server,
            insecure=args.insecure,
            activation_timeout=args.activation_timeout,
        )
    except (ValueError, SepalsError) as exc:
        print(f"sepals-client: {exc}", file=sys.stderr)
        return 2

    def _terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        served = client.run(max_tasks=args.max_tasks)
    except NodeRefusedError as exc:
        print(f"sepals-client: refused: {exc}", file=sys.stderr)
        return 4
    except (FederationConnectionError, SepalsError) as exc:
        print(f"sepals-client: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    print(f"sepals-client: served {served} tasks", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
