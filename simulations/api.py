"""``sepals.simulations.simulate``: simulate your own app from Python.

The same :class:`~sepals.client.EdgeApp` that a deployed client passes to
``join_federation`` runs here on Flower's simulation engine, with the parties kept
apart as in ``sepals-sim`` (an evaluator subprocess creates the keys and writes the
clients' secret key; the server in this process holds only the public one; Ray workers
train; the evaluator decrypts every global model). The trained model comes back from the
evaluator's ``state_dict`` file, never from the server::

    from sepals.simulations import simulate

    report, model = simulate("examples/regression_app.py:make_app", clients=5, rounds=5)

``app`` is either a spec string (``module:attr`` or ``path/to/file.py:attr``, plus
``app_args``), which every process imports on its own, or an ``EdgeApp`` object, which
must pickle with ``cloudpickle`` (functions defined in ``__main__`` or in a module the
Ray workers can import). A spec is the safer choice for models or datasets that do not
pickle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sepals.common.config import DEFAULT_UPDATE_BOUND, EncryptionConfig, PrivacyConfig
from sepals.common.explain_spec import explanation_option
from sepals.common.federation import FederationConfig, sampled_per_round
from sepals.common.log import show_flower_once
from sepals.simulations.process_env import apply_process_env

if TYPE_CHECKING:
    from torch import nn

    from sepals.client.edge_app import EdgeApp
    from sepals.simulations.harness import ProgressFn


class SimulationResult(NamedTuple):
    """What :func:`simulate` returns: ``report, model = simulate(...)``.

    Attributes:
        report: The run's report, as written to ``OUT/report.json``.
        model: The final global model (the app's DP-compatible architecture) with the
            weights the evaluator decrypted and saved to ``OUT/model.pt``.

    """

    report: dict[str, Any]
    model: nn.Module


def simulate(
    app: str | EdgeApp,
    *,
    clients: int = 10,
    rounds: int = 10,
    fraction: float = 1.0,
    partition: str = "iid",
    epsilon: float | None = None,
    privacy: PrivacyConfig | None = None,
    encryption: str | EncryptionConfig = "bfv",
    seed: int = 0,
    out: str | os.PathLike[str] = "runs/latest",
    device: str = "auto",
    local_epochs: int = 1,
    batch_size: int = 32,
    learning_rate: float = 0.05,
    fraction_evaluate: float = 0.0,
    noise_shares: int = 1,
    app_args: Mapping[str, str] | None = None,
    cpus: int | None = None,
    ray_address: str | None = None,
    progress: ProgressFn | None = None,
    insecure_reproducible: bool = False,
    update_bound: float = DEFAULT_UPDATE_BOUND,
    print_progress: bool = True,
    verbose: bool = False,
    explain: Any = None,
) -> SimulationResult:
    """Simulate ``app`` over ``clients`` clients and return the report and trained model.

    Args:
        app: ``module:attr`` / ``path/to/file.py:attr`` naming an ``EdgeApp`` (or a
            function returning one), or an ``EdgeApp`` object that ``cloudpickle`` can
            serialize.
        clients: Number of simulated clients; the app's ``train_data`` is split among
            them (unless it gives ``client_data``).
        rounds: Federated rounds.
        fraction: Fraction of clients sampled each round.
        partition: ``iid``, ``dirichlet:ALPHA`` or ``shards:K`` (flwr-datasets
            partitioners; a continuous target is partitioned by its decile).
        epsilon: Every client's total epsilon; ``0`` turns DP off. ``None`` keeps the
            app's own ``privacy``.
        privacy: Every client's whole privacy budget (overrides the app's and
            ``epsilon``).
        encryption: ``bfv``, ``ckks``, ``none``, or an :class:`EncryptionConfig`.
        seed: Seed of the partitioning, the model's initialisation and the server's
            client sampling (public values). The DP sampling and noise never derive from
            it, except with ``insecure_reproducible``.
        out: Output folder: ``report.json``, ``model.pt``, plots, ``keys/``.
        device: ``auto`` (the app's device, else CUDA when present), ``cpu`` or ``cuda``.
        local_epochs: Local epochs per round.
        batch_size: (Expected) local batch size.
        learning_rate: Local SGD learning rate.
        fraction_evaluate: Fraction of clients running federated evaluation each round.
        noise_shares: Kept for plans that name it: ``M > 1`` needs BFV with masking and
            ``M`` at most its threshold, but every client still adds its whole noise
            (:attr:`~sepals.common.federation.FederationConfig.noise_shares`).
        app_args: String arguments of the spec's factory (spec only).
        cpus: CPUs Ray may use (default: all).
        ray_address: ``HOST:PORT`` of an existing Ray cluster to run the clients on, one
            CPU each (instead of a local Ray with ``cpus``); this process must run on a
            node of the cluster, and ``out`` lie on a filesystem every node mounts at
            the same path (the clients read their key file there).
        progress: Called with each round's row (see ``report.json``'s ``rounds``).
        update_bound: BFV: the largest change of one weight from the initial model an
            update carries; larger changes are clamped on the client and reported (see
            :attr:`~sepals.common.config.EncryptionConfig.update_bound`). Ignored when
            ``encryption`` is an :class:`EncryptionConfig`.
        insecure_reproducible: TESTS ONLY. Derive the DP sampling, noise and rounding
            from ``seed`` so that a run repeats exactly; the reported epsilon then does
            not hold, and the report and summary line say so.
        print_progress: Print what ``sepals-sim`` prints: the start line, one line per
            round and the summary.
        verbose: Also show Flower's own log lines (each once), as ``sepals-sim -v``.
        explain: After training, a private federated explanation round and a central
            one to compare (``explanation.json``, ``explanation.png``, the report's
            ``explanation``): ``True`` (the defaults), a method name, a dict of
            :class:`~sepals.common.explain_spec.ExplanationSpec` fields or a spec; its
            epsilon comes out of every client's budget (docs/explain.md).

    Returns:
        ``(report, model)``. ``report["final"]["aggregated_rounds"]`` counts the rounds
        that changed the model; when it is 0 (every update excluded or declined), the
        model is the shared round-0 initialisation.

    Raises:
        ValueError: a bad setting, or an app that cannot be loaded or split.
        ModelCompatibilityError: a model that DP-SGD cannot train, or a checkpoint that
            does not fit it.

    A script may call ``simulate`` at top level, without an ``if __name__ ==
    "__main__":`` guard: the helper processes it starts never import the script.

    """
    # ``import sepals`` stays light: torch, Flower and the harness load when a run starts.
    import torch

    from sepals.client.edge_app import EdgeApp, load_edge_app
    from sepals.common.masking import masked_federation
    from sepals.simulations.config import SimulationConfig, absolute_spec
    from sepals.simulations.harness import run_experiment
    from sepals.simulations.progress import progress_line, start_line, started_line
    from sepals.simulations.report import explanation_line, summarize

    apply_process_env()
    show_flower_once(logging.DEBUG if verbose else logging.ERROR)
    if verbose:
        logging.getLogger("sepals").setLevel(logging.INFO)
    if isinstance(app, EdgeApp):
        if app_args:
            raise ValueError("app_args are for a spec string, not an EdgeApp object")
        edge, spec, obj = app, "<EdgeApp object>", app
    elif isinstance(app, str):
        spec = absolute_spec(app)
        edge, obj = load_edge_app(spec, dict(app_args or {})), None
    else:
        raise ValueError(f"app must be a spec string or an EdgeApp, got {type(app).__name__}")
    if privacy is None:
        privacy = edge.privacy
        if epsilon is not None:
            if epsilon < 0:
                raise ValueError(f"epsilon must be >= 0 (0 turns DP off), got {epsilon}")
            privacy = PrivacyConfig(
                target_epsilon=epsilon if epsilon > 0 else None,
                delta=privacy.delta,
                max_grad_norm=privacy.max_grad_norm,
                accountant=privacy.accountant,
            )
    if isinstance(encryption, str):
        # Sized like sepals-sim: for the most updates one aggregate holds.
        encryption = EncryptionConfig(
            scheme=encryption,  # type: ignore[arg-type]
            max_clients=sampled_per_round(max(clients, 1), fraction, 1),
            update_bound=update_bound,
        )
    federation = FederationConfig(
        rounds=rounds,
        fraction_train=fraction,
        min_train_clients=1,
        fraction_evaluate=fraction_evaluate,
        local_epochs=local_epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        explanation=explanation_option(explain),
    )
    if noise_shares != 1:
        if encryption.scheme != "bfv":
            raise ValueError("noise_shares needs BFV encryption with pairwise masking")
        sampled = sampled_per_round(max(clients, 1), fraction, 1)
        federation = masked_federation(federation, sampled, noise_shares=noise_shares)
    config = SimulationConfig(
        clients=clients,
        partition=partition,
        federation=federation,
        privacy=privacy,
        encryption=encryption,
        out=str(out),
        cpus=cpus,
        ray_address=ray_address,
        app=spec,
        app_args=tuple((k, str(v)) for k, v in (app_args or {}).items()),
        device=device,
        insecure_reproducible=insecure_reproducible,
    )
    on_round, on_start = progress, None
    if print_progress:
        metric = edge.metric_name

        def on_round(row: dict[str, Any]) -> None:
            progress_line(row, rounds, metric)
            if progress is not None:
                progress(row)

        def on_start(info: dict[str, Any]) -> None:
            print(started_line(info, metric), flush=True)

        print(start_line(config), flush=True)
    report = run_experiment(config, progress=on_round, app=obj, on_start=on_start)
    if print_progress:
        print(summarize(report), flush=True)
        if "explanation" in report:
            print(explanation_line(report["explanation"]), flush=True)
    model = edge.build_model_factory()()
    if report["final"].get("model"):
        state = torch.load(Path(out) / report["final"]["model"], weights_only=True)
        model.load_state_dict(state)
    return SimulationResult(report, model)


def load_model(
    path: str | os.PathLike[str],
    app: str | EdgeApp | Callable[[], nn.Module],
    *,
    app_args: Mapping[str, str] | None = None,
) -> nn.Module:
    """The model a run saved (``OUT/model.pt``), in the architecture the run trained.

    sepals replaces layers that DP-SGD cannot train (BatchNorm becomes GroupNorm, as
    Opacus' ``ModuleValidator.fix`` does), so the saved ``state_dict`` does not load into
    the app's own model class; ``report.json``'s ``config.model.replaced_layers`` lists
    them. This builds the model the way the run did and loads the weights::

        model = sepals.load_model("runs/latest/model.pt", Net)

    Args:
        path: The saved ``state_dict``.
        app: The run's app (an ``EdgeApp`` or its spec string: its checkpoint and
            trainable part are rebuilt too), or the app's model factory.
        app_args: String arguments of the spec's factory (spec only).

    Raises:
        ValueError: the app cannot be loaded.
        RuntimeError: the weights do not fit the rebuilt model (another app's).

    """
    # Torch and the client SDK load when a model is rebuilt.
    import torch

    from sepals.client.edge_app import EdgeApp, load_edge_app
    from sepals.client.training import make_dp_compatible

    if isinstance(app, str):
        app = load_edge_app(app, dict(app_args or {}))
    factory = app.build_model_factory() if isinstance(app, EdgeApp) else make_dp_compatible(app)
    model = factory()
    model.load_state_dict(torch.load(Path(path), map_location="cpu", weights_only=True))
    return model
