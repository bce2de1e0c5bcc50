"""The default job of ``flwr run .``: sepals as a Flower app in Flower's local simulation.

The project's ``pyproject.toml`` names :data:`server_app` and :data:`client_app` of this
module as its Flower components. The job
is the one ``sepals-sim`` runs by default: digits, IID, DP-SGD at epsilon 8 and BFV
encryption, with every setting in ``[tool.flwr.app.config]`` (override them with
``flwr run . --run-config "rounds=5 epsilon=4.0"``). The federation size is Flower's
(``--federation-config "num-supernodes=N"``); node ``i`` of ``N`` trains on partition
``i`` of ``N``.

The parties stay apart as in :mod:`sepals.simulations.harness`:

* the ServerApp (:func:`server_main`) asks an evaluator subprocess for the HE keys;
  the subprocess writes the clients' secret context to ``RUN/keys/clients.secret``
  (mode 0600) and hands back only the public context, so the ServerApp process never
  holds a secret key. ``RUN`` is ``$FLWR_HOME/sepals-runs/<run id>``;
* the ServerApp, as the operator, fixes a signed
  :class:`~sepals.common.plan.FederationPlan` and writes it to ``RUN/plan.json``; it signs
  every round with a fresh operator key that never leaves its process;
* every ClientApp (:func:`client_runtime`) reads the plan and the secret context from
  ``RUN`` and serves only the rounds the plan allows. The secret file is deleted when
  the ServerApp ends.

Evaluation is central, as in ``sepals-sim``: the evaluator subprocess decrypts each
round's global model and scores it on the held-out test split
(:mod:`sepals.simulations.flwr_eval`); the ServerApp logs the score each round and on its
closing line. With ``fraction-evaluate`` above 0, clients also evaluate the decrypted
model on their own test split and report it (federated evaluation).

``--run-config "app='path/to/app.py:make_app'"`` runs your own
:class:`~sepals.client.EdgeApp` instead of a bundled dataset, as ``sepals-sim --app``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.utils import get_flwr_home

from sepals.client.app import make_client_app
from sepals.common.accounting import summary_epsilon
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.data import DATASET_NAMES
from sepals.common.errors import SepalsError
from sepals.common.federation import FederationConfig, sampled_per_round
from sepals.common.files import atomic_write, checkpoint_sha256
from sepals.common.log import LOGGER, log
from sepals.common.masking import masked_federation
from sepals.common.models import num_parameters
from sepals.common.partition import PartitionSpec
from sepals.common.plan import FederationPlan
from sepals.common.scheme import make_server_codec
from sepals.server.serverapp.app import ServerSettings, build_strategy, require_aggregation
from sepals.simulations.app_data import app_caps, app_train_sizes
from sepals.simulations.clients import SimulatedClientProvider, simulation_roster
from sepals.simulations.config import AppSource, bundled_source
from sepals.simulations.flwr_eval import CentralEvaluation, resolve_app_spec
from sepals.simulations.harness import simulated_plan
from sepals.simulations.process_env import apply_process_env
from sepals.simulations.progress import format_metric

PRETRAINED_JOB_SPEC = "sepals.simulations.jobs:pretrained_job"
RUNS_DIR = "sepals-runs"
PLAN_FILE = "plan.json"
JOB_FILE = "job.json"
SECRET_FILE = "clients.secret"
NODE_WAIT_SECONDS = 60.0

# Run-config keys and their types; defaults live in the pyproject's [tool.flwr.app.config].
_INT_KEYS = ("rounds", "min-train-clients", "local-epochs", "batch-size", "seed", "masking")
_FLOAT_KEYS = ("fraction-train", "fraction-evaluate", "lr", "epsilon", "delta", "max-grad-norm")
_STR_KEYS = ("dataset", "partition", "scheme", "accountant", "pretrained", "app", "app-args")
RUN_CONFIG_KEYS = _INT_KEYS + _FLOAT_KEYS + _STR_KEYS


def _get(config: Mapping[str, Any], key: str, default: Any) -> Any:
    value = config.get(key, default)
    if key in _INT_KEYS and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"run config {key!r} must be an integer, got {value!r}")
    if key in _FLOAT_KEYS:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"run config {key!r} must be a number, got {value!r}")
        value = float(value)
    if key in _STR_KEYS and not isinstance(value, str):
        raise ValueError(f"run config {key!r} must be a string, got {value!r}")
    return value


@dataclass(frozen=True)
class FlowerJob:
    """The settings of a ``flwr run .`` job.

    Attributes:
        dataset: A bundled dataset (``digits``, ``breast_cancer``, ``mnist5k``).
        partition: ``iid``, ``dirichlet:ALPHA`` or ``shards:K``.
        federation: Rounds, sampling and local training.
        privacy: Every client's budget (``target_epsilon=None``: DP off).
        scheme: ``bfv``, ``ckks`` or ``none`` (encryption off).
        masking: Pairwise masks with BFV (run config ``masking``, 1 or 0; default 1),
            with the default degree and threshold for the clients sampled per round.
        pretrained: A checkpoint path (run config ``pretrained``; ``""``: none) that
            selects the dataset's public-pretraining job
            (:func:`sepals.simulations.jobs.pretrained_app`). Every node reads it from
            the same path.
        app: Your own app instead of a bundled dataset (run config ``app``;
            ``module:attr`` or ``path/to/file.py:attr``, as ``sepals-sim --app``), its
            training data split among the nodes with ``partition``.
        app_args: String arguments of the app's factory (run config ``app-args``,
            ``"K=V,K=V"``).

    """

    dataset: str = "digits"
    partition: str = "iid"
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    scheme: str = "bfv"
    masking: bool = True
    pretrained: str = ""
    app: str = ""
    app_args: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.dataset not in DATASET_NAMES:
            raise ValueError(
                f"run config 'dataset' must be one of {', '.join(DATASET_NAMES)}, "
                f"got {self.dataset!r}"
            )
        PartitionSpec.parse(self.partition)
        if self.scheme not in ("bfv", "ckks", "none"):
            raise ValueError(f"run config 'scheme' must be bfv, ckks or none, got {self.scheme!r}")
        if self.pretrained and not Path(self.pretrained).expanduser().exists():
            raise ValueError(f"run config 'pretrained': no checkpoint at {self.pretrained}")
        if self.app and self.pretrained:
            raise ValueError(
                "run config 'pretrained' selects a bundled dataset's pretraining job; an "
                "'app' names its checkpoint itself (EdgeApp(pretrained=...))"
            )
        if self.app_args and not self.app:
            raise ValueError("run config 'app-args' needs 'app'")

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> FlowerJob:
        """The job that Flower's run config describes (missing keys take the defaults).

        Raises:
            ValueError: an unknown key, a value of the wrong type, or a bad setting; the
                message names the key.

        """
        unknown = sorted(set(config) - set(RUN_CONFIG_KEYS))
        if unknown:
            raise ValueError(
                f"unknown run config key(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(RUN_CONFIG_KEYS)}"
            )
        fed = FederationConfig()
        priv = PrivacyConfig()
        epsilon = _get(config, "epsilon", 8.0)
        if epsilon < 0:
            raise ValueError(f"run config 'epsilon' must be >= 0 (0 turns DP off), got {epsilon}")
        federation = FederationConfig(
            rounds=_get(config, "rounds", 30),
            fraction_train=_get(config, "fraction-train", 1.0),
            min_train_clients=_get(config, "min-train-clients", 1),
            fraction_evaluate=_get(config, "fraction-evaluate", 0.0),
            local_epochs=_get(config, "local-epochs", 1),
            batch_size=_get(config, "batch-size", 16),
            learning_rate=_get(config, "lr", 0.214),
            momentum=fed.momentum,
            seed=_get(config, "seed", 0),
        )
        privacy = PrivacyConfig(
            target_epsilon=epsilon if epsilon > 0 else None,
            delta=_get(config, "delta", priv.delta),
            max_grad_norm=_get(config, "max-grad-norm", 1.0),
            accountant=_get(config, "accountant", priv.accountant),
        )
        return cls(
            dataset=_get(config, "dataset", "digits"),
            partition=_get(config, "partition", "iid"),
            federation=federation,
            privacy=privacy,
            scheme=_get(config, "scheme", "bfv"),
            masking=_get(config, "masking", 1) != 0,
            pretrained=_get(config, "pretrained", ""),
            app=_get(config, "app", "").strip(),
            app_args=_app_args(_get(config, "app-args", "")),
        )

    def app_source(self, clients: int, spec: str | None = None) -> AppSource:
        """The job's app as every party loads it: the dataset, its pretraining job, or ``app``.

        ``spec`` is ``app`` as the ServerApp resolved it
        (:func:`sepals.simulations.flwr_eval.resolve_app_spec`).
        """
        if self.app:
            return AppSource(spec or self.app, self.app_args)
        if not self.pretrained:
            return bundled_source(self.dataset, clients, self.partition, self.federation.seed)
        path = str(Path(self.pretrained).expanduser().resolve())
        seed = str(self.federation.seed)
        args = (("dataset", self.dataset), ("checkpoint", path), ("seed", seed))
        return AppSource(PRETRAINED_JOB_SPEC, args)

    def masked(self, clients: int) -> FederationConfig:
        """The federation with masking resolved for ``clients`` nodes (see ``masking``)."""
        fed = self.federation
        sampled = sampled_per_round(max(clients, 1), fed.fraction_train, fed.min_train_clients)
        if not self.masking or self.scheme != "bfv" or sampled < 2:
            return fed
        return masked_federation(fed, sampled)

    def encryption(self, clients: int) -> EncryptionConfig:
        """Encryption sized for the updates one aggregate holds with ``clients`` nodes."""
        fed = self.federation
        return EncryptionConfig(
            scheme=self.scheme,  # type: ignore[arg-type]
            max_clients=sampled_per_round(
                max(clients, 1), fed.fraction_train, fed.min_train_clients
            ),
        )


def _app_args(text: str) -> tuple[tuple[str, str], ...]:
    """Run config ``app-args`` (``"K=V,K=V"``) as pairs."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"run config 'app-args' must be 'K=V,K=V', got {text!r}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def run_directory(run_id: int) -> Path:
    """``$FLWR_HOME/sepals-runs/<run_id>``: where a run's plan and client key live."""
    return get_flwr_home() / RUNS_DIR / str(int(run_id))


def _attach_log_handler() -> None:
    """Show sepals' INFO lines in the run's log.

    Flower's simulation process logs the root logger into the run's log; where nothing
    does, a handler on stderr is added.
    """
    LOGGER.setLevel(logging.INFO)
    if logging.getLogger().handlers:
        return
    if not any(getattr(h, "_sepals_flwr", False) for h in LOGGER.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s :      [sepals] %(message)s"))
        handler._sepals_flwr = True  # type: ignore[attr-defined]
        LOGGER.addHandler(handler)


class RuntimeInstallError(SepalsError):
    """Flower installed this app's dependencies at run time; sepals runs offline."""


def check_no_runtime_install() -> None:
    """Refuse to run inside an environment that Flower built at run time.

    Flower 1.41 runs ``uv sync`` for an app's dependencies before loading it unless the
    SuperLink was started with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``; it then
    puts ``$FLWR_HOME/runtime-envs/<run>`` on ``sys.path``. (The project's
    ``[tool.uv] offline = true`` keeps that ``uv sync`` from downloading anything.)

    Raises:
        RuntimeInstallError: such an environment is on ``sys.path``.

    """
    envs = (get_flwr_home() / "runtime-envs").resolve()
    for entry in sys.path:
        try:
            inside = Path(entry).resolve().is_relative_to(envs)
        except (OSError, ValueError):
            continue
        if inside:
            raise RuntimeInstallError(
                "Flower installed this app's dependencies at run time "
                f"({entry}); run `flwr run .` with "
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 and restart the local "
                "SuperLink (it keeps the environment it was started with)"
            )


def _wait_for_nodes(grid: Any, timeout: float) -> int:
    """The number of connected nodes, once it is positive and has settled."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        count = len(list(grid.get_node_ids()))
        if count > 0 and count == last:
            return count
        if time.monotonic() > deadline:
            if count > 0:
                return count
            raise RuntimeError(f"no SuperNode connected within {timeout:.0f} s")
        last = count
        time.sleep(0.5)


def server_main(grid: Any, context: Any) -> None:
    """Run the default job as the ServerApp of ``flwr run .``.

    Raises:
        ValueError: a bad run config (the message names the key).
        RuntimeInstallError: Flower installed the app's dependencies at run time.
        NoRoundAggregatedError: no round aggregated any update.

    """
    apply_process_env()
    _attach_log_handler()
    check_no_runtime_install()
    try:
        job = FlowerJob.from_run_config(dict(context.run_config))
        spec = resolve_app_spec(job.app) if job.app else None
        if spec is not None:
            job.app_source(0, spec).load()  # a bad app fails here, before anything waits
    except ValueError as exc:
        log(ERROR, "sepals flwr app: error: %s", str(exc).replace("\n", " "))
        raise
    clients = _wait_for_nodes(grid, NODE_WAIT_SECONDS)
    fed = job.masked(clients)
    encryption = job.encryption(clients)
    run_dir = run_directory(context.run_id)
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log(
        INFO,
        "sepals flwr app: %s on %s nodes (%s), %s rounds, epsilon %s, encryption %s",
        spec or job.dataset,
        clients,
        job.partition,
        fed.rounds,
        job.privacy.target_epsilon if job.privacy.enabled else "off",
        encryption.scheme,
    )
    log(INFO, "sepals flwr app: federated evaluation %s", fed.evaluation_disclosure)
    source = job.app_source(clients, spec)
    edge = source.load()
    vector_length = num_parameters(edge.build_model_factory()())
    caps = app_caps(source, clients, job.partition, fed.seed)
    # Every client's FedAvg weight is exact when no client holds more than the cap.
    fed = replace(fed, weight_cap=max(app_train_sizes(source, clients, job.partition, fed.seed)))
    sha256 = checkpoint_sha256(job.pretrained) if job.pretrained else ""
    # Keys for the BFV ring sized to this model; each client sizes the same way.
    encryption = encryption.sized_for(vector_length)
    secret_path = None
    if encryption.enabled:
        (run_dir / "keys").mkdir(parents=True, exist_ok=True, mode=0o700)
        secret_path = str((run_dir / "keys" / SECRET_FILE).resolve())
    central = CentralEvaluation(
        encryption,
        secret_path,
        source,
        seed=fed.seed,
        clients=clients,
        partition=job.partition,
        rounds=fed.rounds,
        metric_name=edge.metric_name,
    )
    try:
        server_codec = make_server_codec(encryption, central.public_context)
        plan, signer = simulated_plan(server_codec, fed, vector_length, sha256)
        settings = ServerSettings(
            federation=fed,
            codec=server_codec,
            vector_length=vector_length,
            roster=simulation_roster(caps),
            metric_higher_is_better=edge.higher_is_better,
            round_signer=signer,
        )
        strategy = build_strategy(settings)
        plan.save(run_dir / PLAN_FILE)
        job_record = {
            "clients": clients,
            "secret": secret_path,
            "scheme": encryption.scheme,
            "app": spec,
        }
        atomic_write(run_dir / JOB_FILE, json.dumps(job_record).encode())
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(),
            num_rounds=fed.rounds,
            timeout=fed.round_timeout,
            evaluate_fn=central.evaluate,
        )
    finally:
        central.close()
        if secret_path is not None:
            Path(secret_path).unlink(missing_ok=True)
    aggregated = sum(1 for r in strategy.history if r.aggregated)
    eps = [r.max_epsilon for r in strategy.history if r.max_epsilon is not None]
    eps_r1 = [
        r.max_epsilon_replace_one for r in strategy.history if r.max_epsilon_replace_one is not None
    ]
    federated = [
        r.federated_accuracy if r.federated_accuracy is not None else r.federated_metric
        for r in strategy.history
        if r.federated_accuracy is not None or r.federated_metric is not None
    ]
    log(
        INFO,
        "sepals flwr app: %s of %s rounds aggregated | epsilon %s | %s | %s",
        aggregated,
        len(strategy.history),
        summary_epsilon(
            {
                "epsilon": max(eps) if eps else None,
                "epsilon_replace_one": max(eps_r1) if eps_r1 else None,
            }
        ),
        central.final_text(),
        f"federated {format_metric(edge.metric_name, federated[-1])}"
        if federated
        else "federated evaluation off",
    )
    require_aggregation(strategy)


def client_runtime(context: Any) -> Any:
    """The :class:`~sepals.client.core.ClientRuntime` of a node in ``flwr run .``'s job.

    Node ``partition-id`` of ``num-partitions`` (Flower's simulation node config) trains
    on that partition of the job's dataset. The plan and the secret context come from the
    run directory the ServerApp's provisioning step wrote.

    Raises:
        ValueError: the run directory lacks the plan or job file, or the node config
            lacks the partition fields.

    """
    apply_process_env()  # before the app loads: its libraries read some switches at import
    job = FlowerJob.from_run_config(dict(context.run_config))
    run_dir = run_directory(context.run_id)
    try:
        record = json.loads((run_dir / JOB_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"no sepals job in {run_dir}: {exc}") from exc
    plan = FederationPlan.load(run_dir / PLAN_FILE)
    node_config = context.node_config
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError("node config lacks 'partition-id' / 'num-partitions'")
    clients = int(node_config["num-partitions"])
    if clients != int(record["clients"]):
        raise ValueError(f"node config has {clients} partitions, the job {record['clients']}")
    provider = SimulatedClientProvider(
        app=job.app_source(clients, record.get("app")),
        clients=clients,
        partition=job.partition,
        seed=job.federation.seed,
        privacy=job.privacy,
        encryption=job.encryption(clients).sized_for(plan.vector_length),
        secret_path=record["secret"],
        plan=plan,
    )
    return provider(context)


client_app = make_client_app(client_runtime)
"""The ClientApp of ``flwr run .``: each node's runtime comes from :func:`client_runtime`."""

server_app = ServerApp()


@server_app.main()
def _server_app_main(grid: Grid, context: Context) -> None:
    """The ServerApp of ``flwr run .``: :func:`server_main`.

    The ServerApp only ever holds the public HE context: a provisioning subprocess writes
    the clients' secret context. It raises :class:`NoRoundAggregatedError` when no round
    aggregated, so that Flower marks the run failed.
    """
    server_main(grid, context)
