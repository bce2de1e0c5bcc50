"""The process that runs one ServerApp task: ``python -m sepals.server.control.serverapp_proc``.

Flower's own ``flwr-serverapp`` takes the task token on its command line, where every
local user can read it in ``ps``. ``sepals-server`` starts this module instead and
writes the token to its standard input; the module then runs the task exactly as
``flwr-serverapp`` does, through Flower 1.41's ``run_serverapp`` (a Flower internal,
pinned with flwr 1.41.x). It connects to the SuperLink's Runtime API on loopback.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from queue import Queue

_TOKEN = re.compile(r"[0-9a-f]{16,256}")


def read_token(stream: object) -> str:
    """One task token (lowercase hex) from the first line of ``stream``.

    Raises:
        ValueError: the line is not a token.

    """
    line = stream.readline(300)  # type: ignore[attr-defined]
    token = line.strip()
    if not _TOKEN.fullmatch(token):
        raise ValueError("standard input does not hold a task token")
    return str(token)


def main(argv: list[str] | None = None) -> int:
    """Run the ServerApp task whose token arrives on standard input."""
    parser = argparse.ArgumentParser(prog="sepals.server.control.serverapp_proc")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--root-certificates", type=Path)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    try:
        token = read_token(sys.stdin)
    except ValueError as exc:
        print(f"sepals serverapp: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.stdin.close()
    # Flower's ServerApp runtime loads only in the process that runs it, once its token
    # has arrived.
    from flwr.supercore.logger import mirror_output_to_queue, restore_output
    from flwr.superlink.runtime import run_serverapp

    log_queue: Queue[str | None] = Queue()
    mirror_output_to_queue(log_queue)
    try:
        run_serverapp(
            runtime_api_address=args.runtime_api_address,
            log_queue=log_queue,
            token=token,
            insecure=args.insecure,
            certificates=None if args.insecure else args.root_certificates.read_bytes(),
            parent_pid=args.parent_pid,
            runtime_dependency_install=False,
        )
    finally:
        restore_output()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
