"""Local multi-client simulation on Flower's simulation engine (Ray backend).

One machine plays every party, but the parties stay apart:

* a *provisioner* subprocess creates the CKKS keys, writes the clients' secret context
  to ``OUT/keys/clients.secret`` (mode 0600) and hands the main process only the public
  context;
* the *server* (ServerApp thread in this process) holds only the public context;
* the *clients* (ClientApps in Ray workers) read the secret context from the key file,
  as a deployed client reads it from its bundle;
* the *evaluator* subprocess, which also reads the key file, decrypts each round's
  global model and measures accuracy on the held-out test split. This is the harness's
  central evaluation; the server never sees its inputs in the clear.

As in a deployment, the harness fixes a :class:`~sepals.common.plan.FederationPlan`
before the run and hands it to every client, which calibrates its noise from it and
serves only rounds that match it; the server signs every round with a fresh operator
key that lives only in this process.

We drive Flower through ``flwr.simulation.run_simulation`` rather than ``flwr run``:
the harness must hand the ServerApp live callbacks (progress line, central evaluation,
report) and hold the run's results in memory, which an app launched by ``flwr run`` in
separate SuperLink/ServerApp processes cannot do. Flower 1.41 marks the function as
deprecated; the deprecation notice is silenced for this call only.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sepals.common.config import EncryptionConfig, FederationConfig, PrivacyConfig
from sepals.common.data import DATASET_NAMES, PartitionSpec, load_dataset
from sepals.common.files import atomic_write
from sepals.common.plan import FederationPlan, OperatorSigner, generate_operator_key

# Flower sends anonymous usage telemetry unless told not to. A privacy product does not.
PROCESS_ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # glibc malloc tuning: Opacus allocates many short-lived per-sample gradient
    # tensors; without this DP-SGD runs about 2x slower (see the design brief).
    "MALLOC_MMAP_THRESHOLD_": "1048576",
    "MALLOC_TRIM_THRESHOLD_": "268435456",
}


def apply_process_env() -> None:
    """Set sepals' environment defaults (telemetry off, offline hub) unless already set."""
    for key, value in PROCESS_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class SimulationConfig:
    """Every setting of a simulation run.

    Attributes:
        dataset: ``digits``, ``breast_cancer`` or ``mnist5k``.
        clients: Number of simulated clients (SuperNodes).
        partition: ``iid``, ``dirichlet:ALPHA`` or ``shards:K``.
        federation: Rounds, sampling and local training.
        privacy: Every client's privacy budget (``target_epsilon=None`` turns DP off).
        encryption: Encryption settings (``scheme="none"`` turns it off).
        out: Output folder for ``report.json``, plots and keys.
        cpus: CPUs Ray may use (default: all).

    """

    dataset: str = "digits"
    clients: int = 10
    partition: str = "iid"
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    out: str = "runs/latest"
    cpus: int | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASET_NAMES:
            raise ValueError(
                f"dataset must be one of {', '.join(DATASET_NAMES)}, got {self.dataset!r}"
            )
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        from sepals.common.config import sampled_per_round

        fed = self.federation
        per_round = sampled_per_round(self.clients, fed.fraction_train, fed.min_train_clients)
        if per_round > self.encryption.max_clients and self.encryption.enabled:
            raise ValueError(
                f"{per_round} clients sampled per round exceed "
                f"encryption.max_clients={self.encryption.max_clients}"
            )
        PartitionSpec.parse(self.partition)
        if self.cpus is not None and self.cpus < 1:
            raise ValueError(f"cpus must be >= 1, got {self.cpus}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view of every effective setting."""
        return {
            "dataset": self.dataset,
            "clients": self.clients,
            "partition": str(PartitionSpec.parse(self.partition)),
            "federation": self.federation.to_dict(),
            "privacy": self.privacy.to_dict(),
            "encryption": self.encryption.to_dict(),
            "out": self.out,
            "cpus": self.cpus or os.cpu_count(),
        }


# --------------------------------------------------------------------------- parties
def _provision_keys(encryption: EncryptionConfig, secret_path: str) -> bytes:
    """Provisioner (runs in a subprocess): write the secret context, return the public one."""
    from sepals.common.codec import generate_secret_context, public_context_bytes

    secret = generate_secret_context(encryption)
    atomic_write(Path(secret_path), secret, secret=True)
    return public_context_bytes(secret)


_EVAL_STATE: dict[str, Any] = {}


def _evaluator_init(
    dataset: str, seed: int, encryption: EncryptionConfig, secret_path: str | None
) -> None:
    import torch

    from sepals.client.training import make_dp_compatible
    from sepals.common.codec import make_client_codec

    torch.set_num_threads(1)
    data = load_dataset(dataset, seed)
    secret = Path(secret_path).read_bytes() if secret_path else None
    _EVAL_STATE["codec"] = make_client_codec(encryption, secret)
    _EVAL_STATE["factory"] = make_dp_compatible(data.model_factory())
    _EVAL_STATE["test"] = data.test.to_torch()


def _evaluator_run(
    global_model: tuple[bytes, float] | None, model_seed: int
) -> tuple[float, float]:
    """Evaluator (subprocess): decrypt a global model, return (loss, accuracy)."""
    from sepals.client.training import evaluate_model
    from sepals.common.protocol import decode_global_model

    factory = _EVAL_STATE["factory"]
    weights = decode_global_model(_EVAL_STATE["codec"], factory, global_model, model_seed)
    loss, acc, _ = evaluate_model(factory, weights, _EVAL_STATE["test"])
    return loss, acc


@dataclass(frozen=True)
class SimulatedClientProvider:
    """Builds a simulated client's runtime inside a Ray worker (picklable: no keys, no data)."""

    dataset: str
    clients: int
    partition: str
    seed: int
    privacy: PrivacyConfig
    encryption: EncryptionConfig
    secret_path: str | None
    plan: FederationPlan

    def __call__(self, context: Any) -> Any:
        """The :class:`ClientRuntime` of the node in ``context``."""
        return _simulated_runtime(self, int(context.node_config["partition-id"]))


@functools.lru_cache(maxsize=64)
def _simulated_runtime(provider: SimulatedClientProvider, pid: int) -> Any:
    """Build a simulated client's runtime once per worker process, not once per message."""
    import torch

    from sepals.client.core import ClientRuntime
    from sepals.common.data import client_partition

    torch.set_num_threads(1)
    train, test = client_partition(
        provider.dataset, provider.clients, provider.partition, provider.seed, pid
    )
    data = load_dataset(provider.dataset, provider.seed)
    secret = Path(provider.secret_path).read_bytes() if provider.secret_path else None
    return ClientRuntime(
        client_id=f"client-{pid}",
        model_factory=data.model_factory(),
        train_data=train.to_torch(),
        test_data=test.to_torch(),
        privacy=provider.privacy,
        encryption=provider.encryption,
        plan=provider.plan,
        secret_context=secret,
        seed=provider.seed,
        deterministic_noise=True,
    )


# --------------------------------------------------------------------------- run
ProgressFn = Callable[[dict[str, Any]], None]


def run_experiment(
    config: SimulationConfig,
    progress: ProgressFn | None = None,
    client_mods: list[Any] | None = None,
) -> dict[str, Any]:
    """Run one simulation and write ``report.json`` and plots into ``config.out``.

    Args:
        config: The run's settings.
        progress: Called with each round's row (see ``report.json``'s ``rounds``).
        client_mods: Flower client mods wrapped around every simulated ClientApp, e.g.
            to inject faulty or adversarial clients in experiments.

    Returns:
        The report, as written to ``report.json``.

    """
    apply_process_env()
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.simulation import run_simulation

    from sepals.client.app import make_client_app
    from sepals.client.training import make_dp_compatible
    from sepals.common.data import client_example_caps
    from sepals.common.models import num_parameters
    from sepals.common.protocol import read_global_record
    from sepals.server.app import ServerSettings, build_strategy, make_server_app
    from sepals.server.roster import NodeRoster
    from sepals.server.strategy import RoundRecord

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    fed = config.federation
    data = load_dataset(config.dataset, fed.seed)
    vector_length = num_parameters(make_dp_compatible(data.model_factory())())
    t_start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")

    secret_path: str | None = None
    public_context: bytes | None = None
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as provisioner:
        if config.encryption.enabled:
            secret_path = str((out / "keys" / "clients.secret").resolve())
            public_context = provisioner.submit(
                _provision_keys, config.encryption, secret_path
            ).result()

    evaluator = cf.ProcessPoolExecutor(
        1,
        mp_context=ctx,
        initializer=_evaluator_init,
        initargs=(config.dataset, fed.seed, config.encryption, secret_path),
    )
    rows: list[dict[str, Any]] = []
    pending: dict[int, RoundRecord] = {}
    last_time = [time.perf_counter()]

    def on_round(record: RoundRecord) -> None:
        pending[record.round] = record

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        global_model = read_global_record(arrays)
        loss, acc = evaluator.submit(_evaluator_run, global_model, fed.seed).result()
        now = time.perf_counter()
        if server_round == 0:
            last_time[0] = now
            return MetricRecord({"loss": loss, "accuracy": acc})
        rec = pending.get(server_round, RoundRecord(round=server_round))
        row = {
            "round": server_round,
            "accuracy": acc,
            "loss": loss,
            "epsilon": rec.max_epsilon,
            "upload_bytes": rec.upload_bytes,
            "download_bytes": rec.download_bytes,
            "seconds": now - last_time[0],
            "clients_accepted": rec.accepted,
            "clients_declined": len(rec.declined),
            "clients_excluded": len(rec.excluded),
            "federated_accuracy": rec.federated_accuracy,
            "federated_loss": rec.federated_loss,
            "aggregate_seconds": rec.aggregate_seconds,
            "codec": rec.codec,
            "quant_error": rec.quant_error,
        }
        last_time[0] = now
        rows.append(row)
        if progress is not None:
            progress(row)
        return MetricRecord({"loss": loss, "accuracy": acc})

    caps = client_example_caps(config.dataset, config.clients, config.partition, fed.seed)
    settings = ServerSettings(
        federation=fed,
        encryption=config.encryption,
        public_context=public_context,
        vector_length=vector_length,
        on_round=on_round,
        evaluate_fn=evaluate_fn,
        # The harness runs every client itself, so their claimed names are true; each
        # may claim at most the examples its partition holds.
        roster=NodeRoster(
            trust_claimed_names=True,
            caps={f"client-{pid}": cap for pid, cap in enumerate(caps)},
            default_cap=max(caps),
        ),
    )
    strategy = build_strategy(settings)
    operator_private, operator_public = generate_operator_key()
    plan = FederationPlan.create(
        fed, strategy.codec.name, strategy.codec.fingerprint_hex, vector_length, operator_public
    )
    strategy.round_signer = OperatorSigner(operator_private, plan.federation_id)
    server_app = make_server_app(settings, strategy)
    client_app = make_client_app(
        SimulatedClientProvider(
            dataset=config.dataset,
            clients=config.clients,
            partition=config.partition,
            seed=fed.seed,
            privacy=config.privacy,
            encryption=config.encryption,
            secret_path=secret_path,
            plan=plan,
        ),
        mods=client_mods,
    )
    cpus = config.cpus or os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "ERROR"},
    }
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.clients,
                backend_config=backend_config,  # type: ignore[arg-type]
            )
    finally:
        evaluator.shutdown(wait=True, cancel_futures=True)
    wall = time.perf_counter() - t_start

    report = build_report(config, rows, strategy.history, vector_length, wall, strategy.codec.name)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    from sepals.simulations.plots import write_plots

    write_plots(report, out)
    return report


def build_report(
    config: SimulationConfig,
    rows: list[dict[str, Any]],
    history: list[Any],
    vector_length: int,
    wall_seconds: float,
    codec: str,
) -> dict[str, Any]:
    """Assemble ``report.json`` from the harness rows and the server's round records."""
    clients: dict[str, dict[str, Any]] = {}
    for record in history:
        for c in record.clients:
            clients[c.client_id] = {
                "id": c.client_id,
                "rounds_participated": c.rounds_participated,
                "epsilon": c.epsilon,
                "delta": c.delta,
                "noise_multiplier": c.noise_multiplier,
                "sample_rate": c.sample_rate,
                "steps": c.total_steps,
                "num_examples": c.num_examples,
                "accountant": c.accountant if c.epsilon is not None else None,
            }
    last = rows[-1] if rows else {}
    eps_values = [c["epsilon"] for c in clients.values() if c["epsilon"] is not None]
    return {
        "config": {**config.to_dict(), "codec": codec, "model_parameters": vector_length},
        "rounds": rows,
        "final": {
            "accuracy": last.get("accuracy"),
            "loss": last.get("loss"),
            "epsilon": max(eps_values) if eps_values else None,
            "delta": config.privacy.delta if config.privacy.enabled else None,
            "wall_seconds": wall_seconds,
            "upload_bytes": int(sum(r["upload_bytes"] for r in rows)),
            "download_bytes": int(sum(r["download_bytes"] for r in rows)),
            "codec": codec,
            "max_quant_error": max(
                (r["quant_error"] for r in rows if r.get("quant_error") is not None),
                default=None,
            ),
        },
        "clients": sorted(clients.values(), key=lambda c: int(c["id"].rsplit("-", 1)[-1])),
        "server_log": [r.to_dict() for r in history],
    }


def summarize(report: dict[str, Any]) -> str:
    """One line about a finished run."""
    f = report["final"]
    eps = f["epsilon"]
    qerr = f.get("max_quant_error")
    return (
        f"final accuracy {100 * f['accuracy']:.2f}% | epsilon "
        f"{'off' if eps is None else f'{eps:.3f}'} | {f['wall_seconds']:.1f} s | "
        f"up {f['upload_bytes'] / 1e6:.2f} MB, down {f['download_bytes'] / 1e6:.2f} MB | "
        f"codec {f.get('codec', '?')}, max quantization error "
        f"{'n/a' if qerr is None else f'{qerr:.1e}'}"
    )
