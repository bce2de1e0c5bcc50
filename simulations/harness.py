"""Local multi-client simulation on Flower's simulation engine (Ray backend).

One machine plays every party, but the parties stay apart:

* the *evaluator* subprocess creates the HE keys, writes the clients' key bundle to
  ``OUT/keys/clients.secret`` (mode 0600) and hands the main process only the public
  context; it then decrypts each round's global model and measures accuracy on the
  held-out test split. This is the harness's central evaluation; the server never
  sees its inputs in the clear;
* the *server* (ServerApp thread in this process) holds only the public context;
* the *clients* (ClientApps in Ray workers) read the secret context from the key file,
  as a deployed client reads it from its bundle.

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

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, MetricRecord

from sepals.client.app import make_client_app
from sepals.client.training import resolve_device
from sepals.common.codec import UpdateCodec
from sepals.common.config import EncryptionConfig
from sepals.common.federation import FederationConfig, sampled_per_round
from sepals.common.log import log, without_flower_notice
from sepals.common.masking import masked_federation
from sepals.common.partition import check_client_sizes
from sepals.common.plan import FederationPlan
from sepals.common.records import read_global_model
from sepals.common.round_signature import OperatorSigner, generate_operator_key
from sepals.common.scheme import make_server_codec
from sepals.server.serverapp.app import ServerSettings, build_strategy, make_server_app
from sepals.server.serverapp.strategy import RoundRecord, simulation_node_order
from sepals.simulations.app_data import app_caps, app_train_sizes
from sepals.simulations.clients import (
    FailureNotes,
    SimulatedClientProvider,
    client_resources,
    pick_device,
    simulation_roster,
    wait_for_workers,
)
from sepals.simulations.config import (
    LEDGER_DIR,
    AppSource,
    SimulationConfig,
    absolute_spec,
    bundled_source,
    pickle_app,
)
from sepals.simulations.evaluator import (
    PerClient,
    evaluator_data,
    evaluator_keys,
    evaluator_run,
    evaluator_save,
)
from sepals.simulations.explain import central_explanation, sized_federation, write_explanation
from sepals.simulations.helper_process import HelperProcess
from sepals.simulations.jobs import pretrained_app
from sepals.simulations.model_info import describe_model, saved_model_note
from sepals.simulations.plots import write_plots
from sepals.simulations.process_env import apply_process_env
from sepals.simulations.ray_cluster import (
    check_reachable,
    cluster_backend_config,
    cluster_client_slots,
)
from sepals.simulations.report import (
    build_report,
    final_fairness,
    mask_row,
    named_reasons,
    spread_of,
)
from sepals.simulations.vce_poller import install as install_vce_poller

if TYPE_CHECKING:
    from sepals.client.canaries import CanarySpec
    from sepals.client.edge_app import EdgeApp
    from sepals.server.serverapp.strategy import ExplanationRecord


ProgressFn = Callable[[dict[str, Any]], None]


def simulated_federation(config: SimulationConfig) -> FederationConfig:
    """The run's federation settings, with masking resolved (see ``config.masking``)."""
    fed = config.federation
    if fed.masking or not config.masking or config.encryption.scheme != "bfv":
        return fed
    sampled = sampled_per_round(config.clients, fed.fraction_train, fed.min_train_clients)
    if sampled < 2:
        log(WARNING, "masking is off: it needs at least 2 clients per round, not %s", sampled)
        return fed
    return masked_federation(fed, sampled)


def fine_tuned_app(config: SimulationConfig, app: EdgeApp | None) -> EdgeApp | None:
    """The app a run simulates once ``config.pretrained`` and ``config.trainable`` apply.

    A bundled dataset with a checkpoint becomes its public-pretraining job
    (:func:`sepals.simulations.jobs.pretrained_app`); an app gets the checkpoint and the
    trainable part in place of its own. ``None``: the bundled dataset, as it is.

    Raises:
        ValueError: a trainable part without a checkpoint for a bundled dataset, or a
            dataset with no pretraining job.

    """
    if config.pretrained is None and config.trainable is None:
        return app
    if app is None and config.app is None:
        return pretrained_app(
            config.dataset, config.pretrained, config.trainable, config.federation.seed
        )
    if app is None:
        spec = absolute_spec(config.app or "")
        app = AppSource(spec, tuple(config.app_args), cwd=os.getcwd()).load()
    changes: dict[str, Any] = {}
    if config.pretrained is not None:
        changes["pretrained"] = config.pretrained
    if config.trainable is not None:
        changes["trainable"] = config.trainable
    return dataclasses.replace(app, **changes)


def simulated_app_source(config: SimulationConfig, app: EdgeApp | None) -> AppSource:
    """How every process of the run loads its app: the given one, ``--app``, or the dataset.

    A bundled dataset is an app like any other (:func:`sepals.simulations.jobs.bundled_app`).
    """
    app = fine_tuned_app(config, app)
    if app is not None:
        return AppSource(pickled=pickle_app(app), cwd=os.getcwd())
    if config.app is not None:
        return AppSource(absolute_spec(config.app), tuple(config.app_args), cwd=os.getcwd())
    return bundled_source(config.dataset, config.clients, config.partition, config.federation.seed)


def he_ring(encryption: EncryptionConfig, vector_length: int) -> dict[str, Any] | None:
    """The report's ring entry: N and ciphertexts per update (``None`` without HE)."""
    if not encryption.enabled:
        return None
    return {
        "poly_modulus_degree": encryption.poly_modulus_degree,
        "ciphertexts_per_update": -(-vector_length // encryption.values_per_ciphertext),
    }


def simulated_plan(
    codec: UpdateCodec, fed: FederationConfig, vector_length: int, checkpoint_sha256: str = ""
) -> tuple[FederationPlan, OperatorSigner]:
    """The plan simulated clients follow, and the signer of the server's rounds.

    The plan is made from the server codec's name, key fingerprint and ring, so the
    simulated server and its clients agree on it; the operator key is fresh and never
    leaves this process (the signer holds it).
    """
    operator_private, operator_public = generate_operator_key()
    plan = FederationPlan.create(
        fed,
        codec.name,
        codec.fingerprint_hex,
        vector_length,
        operator_public,
        checkpoint_sha256=checkpoint_sha256,
        poly_modulus_degree=codec.poly_modulus_degree,
    )
    return plan, OperatorSigner(operator_private, plan.federation_id)


def run_experiment(
    config: SimulationConfig,
    progress: ProgressFn | None = None,
    client_mods: list[Any] | None = None,
    *,
    app: EdgeApp | None = None,
    on_start: ProgressFn | None = None,
    canaries: CanarySpec | None = None,
) -> dict[str, Any]:
    """Run one simulation and write ``report.json``, ``model.pt`` and plots into ``config.out``.

    Args:
        config: The run's settings.
        progress: Called with each round's row (see ``report.json``'s ``rounds``).
        client_mods: Flower client mods wrapped around every simulated ClientApp, e.g.
            to inject faulty or adversarial clients in experiments.
        app: An :class:`EdgeApp` object to simulate instead of ``config.app``'s spec;
            it must pickle with ``cloudpickle`` (see :class:`AppSource`).
        on_start: Called once keys, Ray and its workers are up, before round 1, with
            ``{"startup_seconds": ...}``.
        canaries: Privacy audits only (:mod:`sepals.simulations.audit`): gradient
            canaries the simulated clients add to their training data.

    Returns:
        The report, as written to ``report.json``.

    Raises:
        ValueError: the app cannot be loaded or gives a client no training data.

    """
    apply_process_env()
    # Flower's simulation engine imports Ray, which reads the environment set just above.
    from flwr.simulation import run_simulation

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    fed = simulated_federation(config)
    config = dataclasses.replace(config, federation=fed)  # the report shows the settings run
    t_start = time.perf_counter()
    source = simulated_app_source(config, app)
    edge = source.load()
    factory = edge.build_model_factory()
    # One build, before any data is split or any process starts: a model or checkpoint
    # that cannot work is refused at once.
    model_info, counts = describe_model(edge, factory)
    sizes = app_train_sizes(source, config.clients, config.partition, fed.seed)
    for warning in check_client_sizes(sizes, fed.batch_size):
        log(WARNING, "%s", warning)
    caps = app_caps(
        source,
        config.clients,
        config.partition,
        fed.seed,
        delta=config.privacy.delta if config.privacy.enabled else None,
    )
    metric_name, higher_is_better = edge.metric_name, edge.higher_is_better
    vector_length = counts.trainable
    # The keys, the plan and the report use the BFV ring sized to the update.
    config = dataclasses.replace(config, encryption=config.encryption.sized_for(vector_length))
    checkpoint_digest = model_info["checkpoint_sha256"]
    model_info["he_ring"] = he_ring(config.encryption, vector_length)
    if canaries is not None:
        if canaries.dimension != vector_length:
            raise ValueError(
                f"canaries of dimension {canaries.dimension} for a {vector_length}-parameter model"
            )
        # A canary is one more example of its client: it may claim it.
        extra = canaries.per_client(config.clients)
        caps = [c + k for c, k in zip(caps, extra, strict=True)]
        sizes = [n + k for n, k in zip(sizes, extra, strict=True)]
    # Every client's FedAvg weight is exact when no client holds more than the cap.
    fed = sized_federation(dataclasses.replace(fed, weight_cap=max(sizes)), edge, config.clients)
    config = dataclasses.replace(config, federation=fed)
    # On a cluster the clients take one CPU each and no GPU, wherever they land.
    device = "cpu" if config.ray_address else pick_device(config.device, edge)
    on_gpu = resolve_device(device).type == "cuda"
    if config.ray_address is not None:
        check_reachable(config.ray_address)  # before any key exists

    secret_path: str | None = None
    if config.encryption.enabled:
        secret_path = str((out / "keys" / "clients.secret").resolve())
    # One subprocess holds the key: it creates it, then evaluates. Its test data loads
    # while Ray starts; it runs the calls in order. It is a fresh interpreter that never
    # imports the caller's script, so simulate() needs no __main__ guard.
    evaluator = HelperProcess("evaluator")
    try:
        public_context = evaluator.submit(evaluator_keys, config.encryption, secret_path).result()
    except BaseException:
        evaluator.shutdown(wait=True, cancel_futures=True)
        raise
    evaluator_ready = evaluator.submit(
        evaluator_data, source, fed.seed, device, config.clients, config.partition
    )
    cpus = config.cpus or os.cpu_count() or 1
    nodes_dir = tempfile.mkdtemp(prefix=".nodes-", dir=out)
    notes = FailureNotes(nodes_dir)
    # Every client keeps its ledger on disk, as a deployed client does (`sepals ledger
    # show OUT/ledgers/client-K.json`). A run's clients start with nothing spent, so the
    # ledgers of an earlier run in the same folder are removed first.
    ledger_dir = out / LEDGER_DIR
    shutil.rmtree(ledger_dir, ignore_errors=True)
    ledger_dir.mkdir(mode=0o700)
    node_names: dict[int, str] = {}

    def name_of(node: int) -> str:
        if node not in node_names:
            path = Path(nodes_dir) / str(node)
            if path.is_file():
                node_names[node] = path.read_text()
        return node_names.get(node, f"node {node}")

    rows: list[dict[str, Any]] = []
    explained: list[ExplanationRecord] = []
    initial: dict[str, Any] = {}
    pending: dict[int, RoundRecord] = {}
    last_time = [time.perf_counter()]
    startup: dict[str, float] = {}
    custom_metric = metric_name != "accuracy"
    eval_errors: list[str] = []
    last_clients: PerClient = {}

    def on_round(record: RoundRecord) -> None:
        pending[record.round] = record

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        global_model = read_global_model(arrays)
        evaluator_ready.result()  # raises the evaluator's own error, if loading failed
        loss, value, error, per_client = evaluator.submit(
            evaluator_run, global_model, fed.seed
        ).result()
        if error is not None and error not in eval_errors:
            eval_errors.append(error)
            log(WARNING, "central evaluation failed: %s", error)
        spread = spread_of(per_client, higher_is_better)
        last_clients.clear()
        last_clients.update(per_client or {})
        metrics = MetricRecord(
            {k: v for k, v in (("loss", loss), (metric_name, value)) if v is not None}
        )
        if server_round == 0:
            initial.update({"loss": loss, "metric": value, "fairness": spread})
            if not custom_metric:
                initial["accuracy"] = value
            wait_for_workers(cpus if config.ray_address is None else cluster_client_slots())
            startup["seconds"] = time.perf_counter() - t_start
            if on_start is not None:
                on_start(
                    {"startup_seconds": startup["seconds"], "round": 0, "model": model_info}
                    | initial
                )
            # Round 1's clock starts when the server starts round 1.
            last_time[0] = time.perf_counter()
            return metrics
        now = time.perf_counter()
        rec = pending.get(server_round, RoundRecord(round=server_round))
        row = {
            "round": server_round,
            "accuracy": None if custom_metric else value,
            "metric": value,
            "loss": loss,
            "fairness": spread,
            "epsilon": rec.max_epsilon,
            "epsilon_replace_one": rec.max_epsilon_replace_one,
            "upload_bytes": rec.upload_bytes,
            "download_bytes": rec.download_bytes,
            "upload_bytes_per_client": rec.upload_bytes // max(rec.accepted, 1),
            "trainable_parameters": counts.trainable,
            "total_parameters": counts.total,
            "seconds": now - last_time[0],
            "aggregated": rec.aggregated,
            "rejected": rec.rejected,
            "clients_accepted": rec.accepted,
            "clients_declined": len(rec.declined),
            "clients_excluded": len(rec.excluded),
            "declined": named_reasons(rec.declined, name_of),
            "excluded": named_reasons(
                rec.excluded, name_of, detail_of=lambda n: notes.detail(n, server_round)
            ),
            "federated_accuracy": rec.federated_accuracy,
            "federated_loss": rec.federated_loss,
            "federated_metric": rec.federated_metric,
            "aggregate_seconds": rec.aggregate_seconds,
            "codec": rec.codec,
            "quant_error": rec.quant_error,
            "mask": mask_row(rec),
            "clamped": {
                name_of(c.node_id): c.clamped_values for c in rec.clients if c.clamped_values
            },
        }
        rows.append(row)
        if progress is not None:
            progress(row)
        last_time[0] = time.perf_counter()
        return metrics

    server_codec = make_server_codec(config.encryption, public_context)
    plan, signer = simulated_plan(server_codec, fed, vector_length, checkpoint_digest)
    settings = ServerSettings(
        federation=fed,
        codec=server_codec,
        vector_length=vector_length,
        on_round=on_round,
        evaluate_fn=evaluate_fn,
        roster=simulation_roster(caps),
        # Sample over stable client ids (client-K), not Flower's random node ids, so a
        # seeded run samples the same clients at any fraction; wait for every node.
        node_order=simulation_node_order,
        min_available_nodes=config.clients,
        metric_higher_is_better=higher_is_better,
        round_signer=signer,
        on_explanation=explained.append,
    )
    strategy = build_strategy(settings)
    server_app = make_server_app(settings, strategy)
    client_app = make_client_app(
        SimulatedClientProvider(
            app=source,
            clients=config.clients,
            partition=config.partition,
            seed=fed.seed,
            privacy=config.privacy,
            encryption=config.encryption,
            secret_path=secret_path,
            plan=plan,
            device="cpu" if config.ray_address else config.device,
            nodes_dir=nodes_dir,
            canaries=canaries,
            ledger_dir=str(ledger_dir),
            insecure_reproducible=config.insecure_reproducible,
        ),
        mods=client_mods,
        on_failure=notes,
    )
    # Worker logs (ANSI-coloured, per actor) reach the terminal only when the sepals
    # logger is verbose; round lines name every failure anyway.
    log_to_driver = logging.getLogger("sepals").isEnabledFor(INFO)
    if config.ray_address is not None:
        backend_config = cluster_backend_config(config.ray_address, log_to_driver)
    else:
        backend_config = {
            "client_resources": client_resources(cpus, on_gpu),
            "init_args": {
                "num_cpus": cpus,
                "include_dashboard": False,
                "logging_level": "ERROR",
                "log_to_driver": log_to_driver,
            },
        }
    model_path, central = out / "model.pt", None
    install_vce_poller()
    try:
        with without_flower_notice("run_simulation"):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.clients,
                backend_config=backend_config,  # type: ignore[arg-type]
            )
        saved = (
            bool(initial)
            and evaluator.submit(
                evaluator_save, str(model_path), saved_model_note(model_info)
            ).result()
        )
        if fed.explanation is not None:  # the central, non-private map, for comparison
            central = evaluator.submit(central_explanation, fed.explanation).result()
    finally:
        evaluator.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(nodes_dir, ignore_errors=True)
    wall = time.perf_counter() - t_start

    report = build_report(config, rows, strategy.history, vector_length, wall, strategy.codec.name)
    report["config"]["metric"] = {"name": metric_name, "higher_is_better": higher_is_better}
    report["config"]["model"] = model_info
    report["initial"] = initial
    report["final"]["metric"] = rows[-1]["metric"] if rows else None
    report["final"]["metric_name"] = metric_name
    report["final"]["model"] = model_path.name if saved else None
    report["final"]["startup_seconds"] = startup.get("seconds")
    report["final"]["aggregated_rounds"] = sum(1 for r in strategy.history if r.aggregated)
    report["final"]["masking"] = (
        {
            "neighbours": fed.mask_neighbours,
            "threshold": fed.mask_threshold,
            "rounds_masks_removed": sum(1 for r in strategy.history if r.masks_removed),
            "rounds_abandoned": sum(1 for r in strategy.history if r.mask_abandoned),
        }
        if fed.masking
        else None
    )
    report["final"]["evaluation_errors"] = eval_errors
    report["final"]["fairness"] = final_fairness(
        rows[-1].get("fairness") if rows else None, last_clients, metric_name
    )
    if fed.explanation is not None:
        report["explanation"] = write_explanation(
            out, explained[0] if explained else None, central,
            dataset=None if app is not None or config.app else config.dataset,
            delta=config.privacy.delta if config.privacy.enabled else None,
        )  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2))

    write_plots(report, out)
    return report
