"""The ClientApp a deployed SuperNode runs for ``sepals-client``, built from the node config."""

from __future__ import annotations

import functools
from pathlib import Path

from flwr.app import Context

from sepals.client.app import make_client_app
from sepals.client.bundle import ClientBundle
from sepals.client.core import ClientRuntime
from sepals.client.edge import edge_runtime
from sepals.client.edge_app import load_edge_app
from sepals.common.ledger import LedgerLock

# Ledger locks of the FAB ClientApp, held until this (per-message) process exits.
_NODE_CONFIG_LOCKS: list[LedgerLock] = []


@functools.lru_cache(maxsize=4)
def _runtime_from_node_config(app_spec: str, bundle_dir: str, ledger: str) -> ClientRuntime:
    bundle = ClientBundle.load(bundle_dir)
    ledger_path = Path(ledger) if ledger else bundle.root / "ledger.json"
    runtime = edge_runtime(bundle, load_edge_app(app_spec), ledger_path)
    lock = LedgerLock(ledger_path)
    lock.acquire()
    _NODE_CONFIG_LOCKS.append(lock)
    return runtime


def _node_config_runtime(context: Context) -> ClientRuntime:
    cfg = context.node_config
    app_spec, bundle_dir = cfg.get("sepals-app"), cfg.get("sepals-bundle")
    if not isinstance(app_spec, str) or not isinstance(bundle_dir, str):
        raise ValueError(
            "this SuperNode runs ClientApps in Flower subprocesses; give it "
            '--node-config \'sepals-app="module:attr" sepals-bundle="DIR"\' or use '
            "sepals-client, which runs the ClientApp in its own process"
        )
    return _runtime_from_node_config(app_spec, bundle_dir, str(cfg.get("sepals-ledger", "")))


# The ClientApp named in the sepals FAB, for plain ``flower-supernode`` nodes (subprocess
# isolation): it finds the edge app, bundle and ledger through the node config.
fab_client_app = make_client_app(_node_config_runtime)
