"""``sepals-server``: run a deployed federation on Flower's SuperLink.

The operator runs ``sepals-server --config server.toml``. The command checks the
configuration (a secret HE context is refused before anything starts), starts the
server's processes (:mod:`sepals.server.control.launcher`), prints one progress line per round
and stops everything when the run ends or on SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from sepals.common.errors import SecretKeyExposureError
from sepals.common.log import configure_cli_logging
from sepals.server.control.config import ServerDeployConfig
from sepals.server.control.launcher import ServerLauncher
from sepals.server.serverapp.deployed_app import DeploymentError
from sepals.server.serverapp.state import CheckpointError

_INSECURE_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! sepals-server --insecure: NO TLS and NO node authentication.                      !!
!! Anyone who can reach this port can join the federation or read its traffic.       !!
!! Use this only for local trials on a machine you control.                          !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sepals-server``."""
    parser = argparse.ArgumentParser(
        prog="sepals-server",
        description="Run a sepals federation server (Flower SuperLink + sepals ServerApp).",
    )
    parser.add_argument("--config", type=Path, required=True, help="server.toml")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no node authentication (local trials only; prints a warning)",
    )
    parser.add_argument(
        "--allow-insecure-permissions",
        action="store_true",
        help="accept a server key readable by other users (trials only; warns)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    configure_cli_logging(args.verbose)
    # Everything this process and its children create (state files, Flower's database,
    # logs) is private to the operator's account.
    os.umask(0o077)
    try:
        cfg = ServerDeployConfig.from_toml(
            args.config, allow_insecure_permissions=args.allow_insecure_permissions
        )
    except ValueError as exc:
        print(f"sepals-server: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.insecure:
        print(_INSECURE_WARNING, file=sys.stderr, flush=True)
    try:
        launcher = ServerLauncher(cfg, insecure=args.insecure)
        launcher.preflight()
    except SecretKeyExposureError as exc:
        print(f"sepals-server: refusing to start: {exc}", file=sys.stderr)
        return 3
    except (ValueError, CheckpointError) as exc:
        print(f"sepals-server: {exc}", file=sys.stderr)
        return 2
    if launcher.state.done_rounds() == cfg.federation.rounds:
        print(f"sepals-server: all {cfg.federation.rounds} rounds are already done", flush=True)
        return 0

    def _terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        launcher.start()
        launcher.register_nodes()
        launcher.submit()
        return launcher.follow()
    except DeploymentError as exc:
        print(f"sepals-server: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        # Nothing interrupts the shutdown: every child process is stopped.
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        launcher.stop()


if __name__ == "__main__":
    raise SystemExit(main())
