"""The ServerApp of a deployed federation.

It runs in the process that ``sepals-server`` starts for each run (see
:mod:`sepals.server.control.executor`). It loads the operator's configuration named in the run
config, writes per-round JSON-lines metrics, and checkpoints the encrypted global model
after every round (:mod:`sepals.server.serverapp.state`).
"""

from __future__ import annotations

import logging
import os
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from sepals.common.errors import SepalsError
from sepals.common.log import LOGGER, log
from sepals.server.control.config import ServerDeployConfig
from sepals.server.nodes import read_node_names
from sepals.server.serverapp.app import ServerSettings, build_strategy
from sepals.server.serverapp.roster import NodeRoster
from sepals.server.serverapp.state import StateDir
from sepals.server.serverapp.strategy import RoundRecord

RUN_CONFIG_KEY = "sepals-config"
# Fault injection for tests: the ServerApp process exits right after it has checkpointed
# this round, before the next round sends anything (a crash at a known point).
FAULT_EXIT_AFTER_ROUND = "SEPALS_FAULT_EXIT_AFTER_ROUND"


class DeploymentError(SepalsError):
    """The server cannot be started or its run failed."""


app = ServerApp()

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
    # sepals-server checked the server key's permissions before it started anything;
    # this process never reads that key.
    cfg = ServerDeployConfig.from_toml(Path(source), allow_insecure_permissions=True)
    state = StateDir(cfg.state_dir)
    _attach_file_log(cfg.state_dir / "server.log")
    codec = cfg.codec()
    checkpoint = state.load_checkpoint(codec, cfg.parameters)
    done = checkpoint.round if checkpoint is not None else 0
    crash_after = os.environ.get(FAULT_EXIT_AFTER_ROUND)

    def sink(record: RoundRecord) -> None:
        state.save_checkpoint(strategy, record.round)
        state.append_metrics(record)
        if crash_after is not None and crash_after == str(record.round):
            log(WARNING, "fault injection: the ServerApp exits after round %s", record.round)
            logging.shutdown()
            os._exit(3)

    # cfg.codec() has checked that the public context exists and matches [encryption].
    public = cfg.public_context.read_bytes() if cfg.public_context is not None else None
    settings = ServerSettings(
        federation=cfg.federation,
        encryption=cfg.encryption,
        public_context=public if cfg.encryption.enabled else None,
        vector_length=cfg.parameters,
        on_round=sink,
        # Nodes are named by their authenticated key (STATE/nodes.json, written by
        # sepals-server at registration), never by the id a reply claims.
        roster=NodeRoster(
            default_cap=cfg.default_max_examples,
            caps=dict(cfg.max_examples),
            node_names=read_node_names(cfg.state_dir),
        ),
        min_available_nodes=cfg.min_available_clients,
        node_wait_timeout=cfg.node_wait_timeout,
        round_offset=done,
        round_signer=cfg.signer(codec),
    )
    strategy = build_strategy(settings)
    if checkpoint is not None:
        checkpoint.restore(strategy)
    remaining = cfg.federation.rounds - done
    log(
        INFO,
        "sepals ServerApp: codec %s, key %s, %s params, rounds %s..%s",
        codec.name,
        codec.fingerprint_hex,
        cfg.parameters,
        done + 1,
        cfg.federation.rounds,
    )
    log(INFO, "sepals ServerApp: federated evaluation %s", cfg.federation.evaluation_disclosure)
    if remaining > 0:
        strategy.start(
            grid=grid,
            initial_arrays=strategy.latest_global or ArrayRecord(),
            num_rounds=remaining,
            timeout=cfg.federation.round_timeout,
        )
    state.mark_done(cfg.federation.rounds)
