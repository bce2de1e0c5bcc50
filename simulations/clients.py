"""Simulated clients: the runtime each Ray worker builds for its node.

Each node's runtime is built from the run's app (a bundled dataset is one), the
signed plan and the secret context file, the way a deployed client builds its own
from its bundle.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sepals.client.edge_app import build_runtime, gathered
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.files import atomic_write
from sepals.common.log import show_flower_once
from sepals.common.plan import FederationPlan
from sepals.common.protocol import KEY_CONFIG
from sepals.server.serverapp.roster import NodeRoster
from sepals.simulations.app_data import app_client_data
from sepals.simulations.config import AppSource
from sepals.simulations.keys import read_secret

if TYPE_CHECKING:
    from sepals.client.canaries import CanarySpec
    from sepals.client.edge_app import EdgeApp


@dataclass(frozen=True)
class SimulatedClientProvider:
    """Builds a simulated client's runtime inside a Ray worker (picklable: no keys, no data).

    Attributes:
        app: The simulated app (a bundled dataset is one too:
            :func:`sepals.simulations.jobs.bundled_app`).
        canaries: Privacy audits only (:mod:`sepals.simulations.audit`): every client's
            training data is wrapped with the canaries it holds.

    """

    app: AppSource
    clients: int
    partition: str
    seed: int
    privacy: PrivacyConfig
    encryption: EncryptionConfig
    secret_path: str | None
    plan: FederationPlan
    device: str = "auto"
    nodes_dir: str | None = None
    canaries: CanarySpec | None = None
    ledger_dir: str | None = None
    insecure_reproducible: bool = False

    def __call__(self, context: Any) -> Any:
        """The :class:`ClientRuntime` of the node in ``context``."""
        pid = int(context.node_config["partition-id"])
        if self.nodes_dir is not None:
            _note_node(self.nodes_dir, int(context.node_id), pid)
        return simulated_runtime(self, pid)


@dataclass(frozen=True)
class FailureNotes:
    """Keeps every simulated client's failures with their full reason, for the run's report.

    A reply carries only a vetted phrase (what a deployed server would see); the
    simulation is one party's run, so its round lines and report may also say what the
    client itself logged. One JSON line per failure, in ``NODES_DIR/<node id>.failures``.
    """

    nodes_dir: str

    def __call__(self, context: Any, msg: Any, action: str, exc: BaseException) -> None:
        """Append the failure of ``msg`` on the node of ``context``."""
        config = msg.content.config_records.get(KEY_CONFIG) if msg.has_content() else None
        server_round = config.get("server-round") if config is not None else None
        line = {"round": server_round, "action": action, "detail": f"{type(exc).__name__}: {exc}"}
        with open(Path(self.nodes_dir) / f"{int(context.node_id)}.failures", "a") as fh:
            fh.write(json.dumps(line) + "\n")

    def detail(self, node_id: int, server_round: int) -> str | None:
        """What node ``node_id`` logged for its last failure in ``server_round``, if any."""
        path = Path(self.nodes_dir) / f"{node_id}.failures"
        if not path.exists():
            return None
        found = None
        for text in path.read_text().splitlines():
            entry = json.loads(text)
            if entry.get("round") == server_round:
                found = f"{entry['action']}: {entry['detail']}"
        return found


@functools.lru_cache(maxsize=4096)
def _note_node(nodes_dir: str, node_id: int, pid: int) -> None:
    """Tell the harness which client a Flower node id plays (for names in round lines)."""
    atomic_write(Path(nodes_dir) / str(node_id), f"client-{pid}".encode(), durable=False)


@functools.lru_cache(maxsize=64)
def simulated_runtime(provider: SimulatedClientProvider, pid: int) -> Any:
    """Build a simulated client's runtime once per worker process, not once per message.

    The run's budget (``provider.privacy``) applies in place of the app's own.
    """
    torch.set_num_threads(1)
    show_flower_once()  # in this worker too, each Flower line at most once
    app = provider.app.load()
    train, test = app_client_data(
        provider.app, provider.clients, provider.partition, provider.seed, pid
    )
    if provider.canaries is not None:
        train = provider.canaries.for_client(pid).add_rows(gathered(train))
    ledger = (
        None if provider.ledger_dir is None else Path(provider.ledger_dir, f"client-{pid}.json")
    )
    return build_runtime(
        app,
        client_id=f"client-{pid}",
        train_data=train,
        test_data=test,
        encryption=provider.encryption,
        plan=provider.plan,
        secret_context=read_secret(provider.secret_path) if provider.secret_path else None,
        ledger_path=ledger,
        privacy=provider.privacy,
        device=pick_device(provider.device, app),
        reproducible_seed=provider.seed if provider.insecure_reproducible else None,
    )


def wait_for_workers(actors: int, timeout: float = 180.0) -> None:
    """Block until Ray is up and ``actors`` client actors are alive (or ``timeout``)."""
    import ray
    from ray._private import state

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ray.is_initialized() and len(state.actors(actor_state_name="ALIVE")) >= actors:
                return
        except Exception:  # Ray still starting: try again
            pass
        time.sleep(0.2)


def simulation_roster(caps: list[int]) -> Any:
    """The node roster of a simulation: client ``client-K`` may claim ``caps[K]`` examples.

    The simulation runs every client itself, so the names the clients claim are true.
    """
    return NodeRoster(
        trust_claimed_names=True,
        caps={f"client-{pid}": cap for pid, cap in enumerate(caps)},
        default_cap=max(caps),
    )


def client_resources(cpus: int, on_gpu: bool) -> dict[str, float]:
    """Ray resources of one simulated client: one CPU, and on a GPU an equal share of it.

    Ray runs ``cpus`` clients at once; with ``num_gpus = 1 / cpus`` they all fit on the
    one GPU together (Ray packs fractional GPUs onto a device).
    """
    if cpus < 1:
        raise ValueError(f"cpus must be >= 1, got {cpus}")
    return {"num_cpus": 1.0, "num_gpus": 1.0 / cpus if on_gpu else 0.0}


def pick_device(flag: str, app: EdgeApp | None) -> str:
    """The device clients use: the flag unless ``auto``, then the app's, then auto."""
    if flag != "auto" or app is None:
        return flag
    return app.device
