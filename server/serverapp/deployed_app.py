"""The ServerApp of a deployed federation.

It runs in the process that ``sepals-server`` starts for each run (see
:mod:`sepals.server.control.executor`). It loads the run spec that the run config names
(:mod:`sepals.server.serverapp.run_spec`, written by the control plane from
``server.toml``), writes per-round JSON-lines metrics, and checkpoints the encrypted
global model after every round (:mod:`sepals.server.serverapp.state`).
"""

from __future__ import annotations

import json
import logging
import os
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from sepals.common.errors import SepalsError
from sepals.common.files import atomic_write
from sepals.common.log import LOGGER, log
from sepals.server.nodes import read_node_names
from sepals.server.serverapp.app import ServerSettings, build_strategy
from sepals.server.serverapp.roster import NodeRoster
from sepals.server.serverapp.run_spec import DeployedRun
from sepals.server.serverapp.state import StateDir
from sepals.server.serverapp.strategy import RoundRecord

RUN_CONFIG_KEY = "sepals-run-spec"
# Fault injection for tests: the ServerApp process exits right after it has checkpointed
# this round, before the next round sends anything (a crash at a known point).
FAULT_EXIT_AFTER_ROUND = "SEPALS_FAULT_EXIT_AFTER_ROUND"


class DeploymentError(SepalsError):
    """The server cannot be started or its run failed."""


app = ServerApp()


def _attach_file_log(path: Path) -> None:
    if any(getattr(h, "baseFilename", None) == str(path) for h in LOGGER.handlers):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)


@app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """The sepals ServerApp of a deployed federation (runs in Flower's ServerApp process)."""
    source = context.run_config.get(RUN_CONFIG_KEY)
    if not isinstance(source, str) or not source:
        raise DeploymentError(f"run config lacks {RUN_CONFIG_KEY!r}: start runs with sepals-server")
    # sepals-server checked server.toml, the keys and the plan before it wrote the spec;
    # this process reads neither server.toml nor the TLS key.
    try:
        spec = DeployedRun.load(Path(source))
    except ValueError as exc:
        raise DeploymentError(str(exc)) from exc
    state = StateDir(spec.state_dir)
    _attach_file_log(spec.state_dir / "server.log")
    codec = spec.codec()
    checkpoint = state.load_checkpoint(codec, spec.parameters)
    done = checkpoint.round if checkpoint is not None else 0
    crash_after = os.environ.get(FAULT_EXIT_AFTER_ROUND)

    def sink(record: RoundRecord) -> None:
        state.save_checkpoint(strategy, record.round)
        state.append_metrics(record)
        if crash_after is not None and crash_after == str(record.round):
            log(WARNING, "fault injection: the ServerApp exits after round %s", record.round)
            logging.shutdown()
            os._exit(3)

    settings = ServerSettings(
        federation=spec.federation,
        codec=codec,
        vector_length=spec.parameters,
        on_round=sink,
        # Nodes are named by their authenticated key (STATE/nodes.json, written by
        # sepals-server at registration), never by the id a reply claims.
        roster=NodeRoster(
            default_cap=spec.default_max_examples,
            caps=dict(spec.max_examples),
            node_names=read_node_names(spec.state_dir),
        ),
        min_available_nodes=spec.min_available_clients,
        node_wait_timeout=spec.node_wait_timeout,
        round_offset=done,
        round_signer=spec.signer(codec),
    )
    strategy = build_strategy(settings)
    if checkpoint is not None:
        checkpoint.restore(strategy)
    remaining = spec.federation.rounds - done
    log(
        INFO,
        "sepals ServerApp: codec %s, key %s, %s params, rounds %s..%s",
        codec.name,
        codec.fingerprint_hex,
        spec.parameters,
        done + 1,
        spec.federation.rounds,
    )
    log(INFO, "sepals ServerApp: federated evaluation %s", spec.federation.evaluation_disclosure)
    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=strategy.latest_global or ArrayRecord(),
            num_rounds=remaining,
            timeout=spec.federation.round_timeout,
        )
    explained = strategy.explain(grid)
    if explained is not None and explained.release is not None:
        # A DP release: the operator may read it (docs/explain.md). A round that released
        # nothing (logged) never replaces an earlier release.
        text = json.dumps(explained.to_dict(), indent=1)
        atomic_write(spec.state_dir / "explanation.json", text.encode())
    state.mark_done(spec.federation.rounds)
