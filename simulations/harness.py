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

import concurrent.futures as cf
import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from sepals.common.accounting import check_delta
from sepals.common.config import (
    EncryptionConfig,
    FederationConfig,
    PrivacyConfig,
    sampled_per_round,
)
from sepals.common.data import (
    PartitionSpec,
    check_client_sizes,
    check_dataset_name,
    check_partition,
    client_train_sizes,
    dataset_model_factory,
    load_dataset,
    partition_indices,
    partition_like,
)
from sepals.common.fairness import client_spread, format_spread
from sepals.common.files import atomic_write, checkpoint_sha256
from sepals.common.finetune import ParameterCounts, check_trainable, describe_trainable
from sepals.common.log import log
from sepals.common.masking import masked_federation
from sepals.common.plan import FederationPlan, OperatorSigner, generate_operator_key
from sepals.simulations.ray_cluster import (
    check_reachable,
    cluster_backend_config,
    cluster_client_slots,
    parse_ray_address,
)

if TYPE_CHECKING:
    from sepals.client.canaries import CanarySpec
    from sepals.client.edge import EdgeApp

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


#: ``OUT/ledgers/client-K.json``: the privacy ledger of each simulated client.
LEDGER_DIR = "ledgers"


@dataclass(frozen=True)
class SimulationConfig:
    """Every setting of a simulation run.

    Attributes:
        dataset: ``digits``, ``breast_cancer`` or ``mnist5k`` (ignored with ``app``).
        clients: Number of simulated clients (SuperNodes).
        partition: ``iid``, ``dirichlet:ALPHA`` or ``shards:K``.
        federation: Rounds, sampling and local training.
        privacy: Every client's privacy budget (``target_epsilon=None`` turns DP off).
        encryption: Encryption settings (``scheme="none"`` turns it off).
        out: Output folder for ``report.json``, plots and keys.
        cpus: CPUs Ray may use (default: all).
        app: An own app instead of a bundled dataset: ``module:attr`` or
            ``path/to/file.py:attr`` naming a :class:`~sepals.client.EdgeApp` or a
            function returning one (see :func:`sepals.client.load_edge_app`).
        app_args: ``(name, value)`` string arguments for that function.
        device: ``auto`` (the app's device, else CUDA when present), ``cpu`` or ``cuda``.
        masking: Pairwise masks under BFV (:mod:`sepals.common.masking`), with the
            default degree and threshold unless ``federation`` sets them; ignored for
            other codecs, and off (with a warning) below two clients per round.
        pretrained: A pretrained checkpoint to start from. With a bundled dataset it
            selects the dataset's public-pretraining job
            (:func:`sepals.simulations.jobs.pretrained_app`; ``sepals pretrain`` writes
            its checkpoint); with an app it replaces the app's ``pretrained``.
        trainable: Parameter-name patterns of what is trained (``None``: the job's or
            the app's own choice).
        reproducible_noise: Derive every client's DP noise from the run's seed, so that
            a run repeats exactly. For tests only: such noise is predictable, and the
            report says so. By default each DP-SGD step's noise generator is seeded
            afresh from ``os.urandom``.
        ray_address: ``HOST:PORT`` of an existing Ray cluster to run the clients on
            (:mod:`sepals.simulations.ray_cluster`), one CPU each; ``None`` starts a
            local Ray with ``cpus``.

    """

    dataset: str = "digits"
    clients: int = 10
    partition: str = "iid"
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    out: str = "runs/latest"
    cpus: int | None = None
    app: str | None = None
    app_args: tuple[tuple[str, str], ...] = ()
    device: str = "auto"
    masking: bool = True
    pretrained: str | None = None
    trainable: tuple[str, ...] | None = None
    reproducible_noise: bool = False
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.app is None:
            check_dataset_name(self.dataset)
            check_partition(self.dataset, self.partition)
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
        if self.ray_address is not None:
            parse_ray_address(self.ray_address)
            if self.cpus is not None:
                raise ValueError(
                    "cpus (--cpus) size a local Ray; on a Ray cluster (--ray-address) "
                    "the cluster's CPUs decide"
                )
            if self.device == "cuda":
                raise ValueError("clients on a Ray cluster train on CPUs: use device cpu or auto")
        if self.app_args and self.app is None:
            raise ValueError("app_args need an app")
        if fed.masking and self.encryption.scheme != "bfv":
            raise ValueError(
                f"masking needs the BFV codec, not encryption scheme {self.encryption.scheme!r}"
            )
        from sepals.client.training import resolve_device

        resolve_device(self.device)  # fails fast on a bad name or a missing CUDA
        if self.trainable is not None:
            object.__setattr__(self, "trainable", check_trainable(self.trainable))
        if self.pretrained is not None and not Path(self.pretrained).expanduser().exists():
            raise ValueError(
                f"pretrained checkpoint {self.pretrained} does not exist"
                + (" (make it with: sepals pretrain)" if self.app is None else "")
            )

    @property
    def label(self) -> str:
        """What is simulated: the dataset's name, or the app's spec."""
        return self.dataset if self.app is None else self.app

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view of every effective setting."""
        return {
            "dataset": self.label,
            "app": self.app,
            "app_args": dict(self.app_args),
            "device": self.device,
            "pretrained": self.pretrained,
            "trainable": None if self.trainable is None else list(self.trainable),
            "clients": self.clients,
            "partition": str(PartitionSpec.parse(self.partition)),
            "federation": self.federation.to_dict(),
            "privacy": self.privacy.to_dict(),
            "encryption": self.encryption.to_dict(),
            "out": self.out,
            "cpus": None if self.ray_address else self.cpus or os.cpu_count(),
            "ray_address": self.ray_address,
        }


# --------------------------------------------------------------------------- own apps
@dataclass(frozen=True)
class AppSource:
    """How a process that is not the main one finds the simulated :class:`EdgeApp`.

    Models and datasets need not pickle, so Ray workers and the evaluator get the app's
    *spec* (``module:attr`` or an absolute ``file.py:attr``, plus its arguments) and
    import it themselves, once per process. An ``EdgeApp`` object handed to
    :func:`sepals.simulations.simulate` travels instead as ``cloudpickle`` bytes
    (``pickled``): functions of ``__main__`` go by value, others by module name, which
    the workers must be able to import.

    Attributes:
        spec: The app's spec (``None`` when ``pickled`` is given).
        args: String arguments of the spec's factory.
        pickled: The cloudpickled ``EdgeApp``.
        cwd: The main process's working directory, put on ``sys.path`` before importing.

    """

    spec: str | None = None
    args: tuple[tuple[str, str], ...] = ()
    pickled: bytes | None = field(default=None, repr=False)
    cwd: str = ""

    def load(self) -> EdgeApp:
        """The app (imported or unpickled once per process)."""
        return _load_app(self)


@functools.lru_cache(maxsize=4)
def _load_app(source: AppSource) -> EdgeApp:
    import sys

    from sepals.client.edge import EdgeApp, load_edge_app

    if source.cwd and source.cwd not in sys.path:
        sys.path.insert(0, source.cwd)
    if source.pickled is not None:
        import cloudpickle

        app = cloudpickle.loads(source.pickled)
        if not isinstance(app, EdgeApp):
            raise ValueError(f"the pickled app is a {type(app).__name__}, not an EdgeApp")
        return app
    if source.spec is None:
        raise ValueError("an AppSource needs a spec or a pickled app")
    return load_edge_app(source.spec, dict(source.args))


def pickle_app(app: EdgeApp) -> bytes:
    """``app`` as cloudpickle bytes, the user's own code by value.

    Functions of modules outside the installed packages (a test file, a script run as
    a module, a notebook) are pickled by value, since the Ray workers and the evaluator
    may not be able to import them; installed libraries go by reference.

    Raises:
        ValueError: the app does not pickle.

    """
    import inspect
    import sysconfig

    import cloudpickle

    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    own: list[Any] = []
    for fn in (app.model_factory, app.loss_fn, app.metric, app.client_data):
        module = inspect.getmodule(fn) if fn is not None else None
        path = getattr(module, "__file__", None)
        if module is None or path is None or module.__name__ == "__main__":
            continue
        if module.__name__.split(".")[0] in ("sepals", "torch") or any(
            str(Path(path).resolve()).startswith(str(Path(p).resolve())) for p in installed
        ):
            continue
        if module not in own:
            own.append(module)
    try:
        for module in own:
            cloudpickle.register_pickle_by_value(module)
        return cloudpickle.dumps(app)  # type: ignore[no-any-return]
    except Exception as exc:
        raise ValueError(
            f"the EdgeApp does not pickle ({type(exc).__name__}: {exc}); pass its "
            "'module:attr' or 'file.py:attr' spec instead"
        ) from exc
    finally:
        for module in own:
            cloudpickle.unregister_pickle_by_value(module)


def absolute_spec(spec: str) -> str:
    """``spec`` with a ``file.py`` target made absolute (workers may run elsewhere)."""
    target, sep, attr = spec.rpartition(":")
    if sep and target.endswith(".py"):
        return f"{Path(target).expanduser().resolve()}:{attr}"
    return spec


def _labels_of(ds: Any) -> npt.NDArray[Any]:
    """The targets of a dataset of ``(x, y)`` pairs, one row per example."""
    import torch

    if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) >= 2:
        y = ds.tensors[1]
    else:
        y = torch.stack([torch.as_tensor(ds[i][1]) for i in range(len(ds))])
    arr = y.detach().cpu().numpy()
    return arr.reshape(len(arr), -1)


def _partition_labels(
    targets: npt.NDArray[Any], spec: PartitionSpec, reference: npt.NDArray[Any] | None = None
) -> npt.NDArray[np.int64]:
    """Integer labels to partition by: class labels as they are, others binned.

    A continuous target is binned by the deciles of ``reference`` (default: of
    ``targets`` itself), so a test split is binned like its train split.
    """
    n = len(targets)
    if spec.kind == "iid":
        return np.zeros(n, dtype=np.int64)
    ref = targets if reference is None else reference
    for t in (targets, ref):
        if t.shape[1] != 1:
            raise ValueError(
                f"partition {spec} needs one target per example; this app's targets have "
                f"{t.shape[1]} values each (use iid or give client_data)"
            )
    y, r = targets[:, 0], ref[:, 0]
    if np.issubdtype(r.dtype, np.integer) or np.all(np.mod(r, 1) == 0):
        return y.astype(np.int64)
    # A continuous target: partition by its decile (label skew becomes target skew).
    edges = np.quantile(r, np.linspace(0.0, 1.0, 11)[1:-1])
    return np.digitize(y, edges).astype(np.int64)


@functools.lru_cache(maxsize=8)
def _app_partitions(
    source: AppSource, clients: int, partition: str, seed: int
) -> tuple[list[npt.NDArray[np.int64]], list[npt.NDArray[np.int64]] | None]:
    """Row indices of every client's train and test share of the app's data.

    The test data is split IID under the ``iid`` partition (when it has an example per
    client), else so that each client's share follows its train label (or binned
    target) distribution, as :func:`sepals.common.data.partition_like` describes.
    """
    app = source.load()
    train, test = app.train_dataset, app.test_dataset
    if train is None:
        raise ValueError("the app gives neither train_data nor client_data")
    spec = PartitionSpec.parse(partition)
    train_targets = _labels_of(train)
    labels = _partition_labels(train_targets, spec)
    train_parts = partition_indices(labels, clients, spec, seed)
    test_parts = None
    if test is not None and spec.kind != "iid" and len(test) > 0:  # type: ignore[arg-type]
        test_labels = _partition_labels(_labels_of(test), spec, train_targets)
        test_parts = partition_like(test_labels, labels, train_parts, seed)
    elif test is not None and len(test) >= clients:  # type: ignore[arg-type]
        zeros = np.zeros(len(test), dtype=np.int64)  # type: ignore[arg-type]
        test_parts = partition_indices(zeros, clients, PartitionSpec("iid"), seed)
    return train_parts, test_parts


def app_client_data(
    source: AppSource, clients: int, partition: str, seed: int, client: int
) -> tuple[Any, Any]:
    """Client ``client``'s ``(train, test-or-None)`` datasets of an own app."""
    from torch.utils.data import Subset

    app = source.load()
    if app.client_data is not None:
        train, test = app.client_data(client, clients)
        return train, test
    train_parts, test_parts = _app_partitions(source, clients, partition, seed)
    test = None
    if test_parts is not None and app.test_dataset is not None and len(test_parts[client]):
        test = Subset(app.test_dataset, test_parts[client].tolist())
    return Subset(app.train_dataset, train_parts[client].tolist()), test  # type: ignore[arg-type]


def app_caps(
    source: AppSource, clients: int, partition: str, seed: int, *, delta: float | None = None
) -> list[int]:
    """Per client, the most examples it may claim.

    Raises:
        ValueError: a client has no training data, or (with DP at ``delta``) has
            ``delta >= 1/n``.

    """
    caps: list[int] = []
    sizes: list[int] = []
    for pid in range(clients):
        train, test = app_client_data(source, clients, partition, seed, pid)
        sizes.append(len(train))
        caps.append(max(sizes[-1], len(test) if test is not None else 0, 1))
    empty = [pid for pid, n in enumerate(sizes) if n < 1]
    if empty:
        raise ValueError(
            f"{len(empty)} of {clients} clients get no training example (first: "
            f"client-{empty[0]}); use fewer clients or another partition"
        )
    if delta is not None:
        check_delta(delta, sizes)
    return caps


def _pick_device(flag: str, app: EdgeApp | None) -> str:
    """The device clients use: the flag unless ``auto``, then the app's, then auto."""
    if flag != "auto" or app is None:
        return flag
    return app.device


# --------------------------------------------------------------------------- parties
def _write_secret_context(encryption: EncryptionConfig, secret_path: str) -> bytes:
    """Key holder (in a subprocess): create the secret context, write it (0600), return it."""
    from sepals.common.scheme import generate_secret_context

    secret = generate_secret_context(encryption)
    atomic_write(Path(secret_path), secret, secret=True)
    return secret


def _provision_keys(encryption: EncryptionConfig, secret_path: str) -> bytes:
    """Key holder (runs in a subprocess): write the secret context, return the public one."""
    from sepals.common.scheme import public_context_bytes

    return public_context_bytes(_write_secret_context(encryption, secret_path))


_EVAL_STATE: dict[str, Any] = {}


def _evaluator_keys(encryption: EncryptionConfig, secret_path: str | None) -> bytes | None:
    """Evaluator (subprocess): create the HE keys (if on) and keep the clients' codec.

    Returns the public context for the server, ``None`` without encryption. The secret
    key leaves this process only in the 0600 key file the simulated clients read.
    """
    import torch

    from sepals.common.scheme import make_client_codec, public_context_bytes

    torch.set_num_threads(1)
    public = None
    secret = None
    if encryption.enabled:
        if secret_path is None:
            raise ValueError("encryption is on but no key file path was given")
        secret = _write_secret_context(encryption, secret_path)
        public = public_context_bytes(secret)
    _EVAL_STATE["codec"] = make_client_codec(encryption, secret)
    return public


def _evaluator_data(
    dataset: str | None,
    app: AppSource | None,
    seed: int,
    device: str,
    clients: int,
    partition: str = "iid",
) -> None:
    """Evaluator (subprocess): load the model factory and the test data.

    That is the held-out test split and the clients' own test splits: their rows of the
    held-out split for a bundled dataset, their datasets for an app.
    """
    from sepals.client.training import make_dp_compatible
    from sepals.common.data import client_test_indices

    _EVAL_STATE["device"] = device
    _EVAL_STATE["owner"] = None
    _EVAL_STATE["client_tests"] = []
    if app is not None:
        edge = app.load()
        _EVAL_STATE["factory"] = edge.build_model_factory()
        _EVAL_STATE["test"] = edge.test_dataset
        _EVAL_STATE["loss_fn"], _EVAL_STATE["metric"] = edge.loss_fn, edge.metric
        tests = [(k, app_client_data(app, clients, partition, seed, k)[1]) for k in range(clients)]
        _EVAL_STATE["client_tests"] = [
            (f"client-{k}", ds) for k, ds in tests if ds is not None and len(ds) > 0
        ]
    else:
        data = load_dataset(dataset or "", seed, num_clients=clients)
        _EVAL_STATE["factory"] = make_dp_compatible(data.model_factory())
        _EVAL_STATE["test"] = data.test.to_torch()
        _EVAL_STATE["loss_fn"], _EVAL_STATE["metric"] = None, None
        # The clients' test splits partition the held-out one: one pass serves both.
        owner = np.full(len(data.test), -1, dtype=np.int64)
        for k, rows in enumerate(client_test_indices(dataset or "", clients, partition, seed)):
            owner[rows] = k
        _EVAL_STATE["owner"] = owner


PerClient = dict[str, float]
"""A metric's value per client id (``client-K``)."""


def _evaluator_run(
    global_model: tuple[bytes, float] | None, model_seed: int
) -> tuple[float | None, float | None, str | None, PerClient | None]:
    """Evaluator (subprocess): decrypt a global model, keep it, evaluate it.

    Returns ``(loss, metric, error, per_client)``: the loss and metric on the held-out
    test split, and the metric on every client's own test split (``None`` without any;
    clients without test data are left out). Without test data, the model is still
    decrypted and kept, and loss and metric are ``None``; so they are when the app's
    loss or metric fails (``error`` says why).
    """
    from sepals.client.training import evaluate_model
    from sepals.common.protocol import decode_global_model

    factory = _EVAL_STATE["factory"]
    weights = decode_global_model(_EVAL_STATE["codec"], factory, global_model, model_seed)
    _EVAL_STATE["latest"] = weights
    owner = _EVAL_STATE.get("owner")
    if _EVAL_STATE["test"] is not None and owner is not None:
        loss, value, grouped = _grouped_accuracy(
            factory, weights, _EVAL_STATE["test"], owner, _EVAL_STATE["device"]
        )
        return loss, value, None, grouped
    loss_value: tuple[float | None, float | None] = (None, None)
    if _EVAL_STATE["test"] is not None:
        try:
            loss, value, _ = evaluate_model(
                factory,
                weights,
                _EVAL_STATE["test"],
                loss_fn=_EVAL_STATE["loss_fn"],
                metric=_EVAL_STATE["metric"],
                device=_EVAL_STATE["device"],
            )
        except Exception as exc:  # the app's own loss or metric
            return None, None, clean_reason(f"{type(exc).__name__}: {exc}"), None
        loss_value = (loss, value)
    per_client: PerClient = {}
    try:
        for client_id, ds in _EVAL_STATE.get("client_tests", []):
            own = evaluate_model(
                factory,
                weights,
                ds,
                loss_fn=_EVAL_STATE["loss_fn"],
                metric=_EVAL_STATE["metric"],
                device=_EVAL_STATE["device"],
            )[1]
            if math.isfinite(own):  # e.g. R^2 of one example is not: that client is left out
                per_client[client_id] = float(own)
    except Exception as exc:  # the app's own loss or metric
        reason = clean_reason(f"per-client evaluation: {type(exc).__name__}: {exc}")
        return *loss_value, reason, None
    return *loss_value, None, per_client or None


def _grouped_accuracy(
    factory: Callable[[], Any],
    weights: npt.NDArray[Any],
    test: Any,
    owner: npt.NDArray[np.int64],
    device: str,
    batch_size: int = 256,
) -> tuple[float, float, PerClient | None]:
    """Cross-entropy and accuracy on ``test``, and the accuracy per owning client.

    One pass over ``test`` (as :func:`sepals.client.training.evaluate_model` makes it,
    batch by batch); ``owner[i]`` is the client index of example ``i`` (``-1``: none).
    """
    import torch
    from torch.utils.data import DataLoader

    from sepals.client.training import resolve_device
    from sepals.common.models import set_flat

    dev = resolve_device(device)
    model = factory()
    set_flat(model, np.asarray(weights))
    model.to(dev)
    model.eval()
    loss_sum = 0.0
    hits: list[npt.NDArray[np.bool_]] = []
    with torch.no_grad():
        for x_batch, y_batch in DataLoader(test, batch_size=batch_size):
            x, y = x_batch.to(dev), y_batch.to(dev)
            out = model(x)
            loss_sum += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
            hits.append((out.argmax(dim=1) == y).cpu().numpy())
    if not hits:
        raise ValueError("cannot evaluate on an empty dataset")
    correct = np.concatenate(hits)
    count = len(correct)
    mine = owner >= 0
    if not mine.any():
        return loss_sum / count, int(correct.sum()) / count, None
    size = np.bincount(owner[mine])
    right = np.bincount(owner[mine], weights=correct[mine].astype(np.float64), minlength=len(size))
    per_client = {f"client-{k}": float(right[k] / size[k]) for k in np.flatnonzero(size)}
    return loss_sum / count, int(correct.sum()) / count, per_client


def _spread_of(per_client: PerClient | None, higher_is_better: bool) -> dict[str, Any] | None:
    """The spread (``ClientSpread.to_dict()``) of per-client values, ``None`` without any."""
    if not per_client:
        return None
    return client_spread(per_client.values(), higher_is_better=higher_is_better).to_dict()


def _evaluator_save(path: str) -> str:
    """Evaluator (subprocess): write the latest decrypted global model's ``state_dict``."""
    import io

    import torch

    from sepals.common.models import set_flat

    model = _EVAL_STATE["factory"]()
    set_flat(model, _EVAL_STATE["latest"])
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    atomic_write(Path(path), buffer.getvalue())
    return path


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
    app: AppSource | None = None
    device: str = "auto"
    nodes_dir: str | None = None
    canaries: CanarySpec | None = None  # privacy audits only (sepals.simulations.audit)
    ledger_dir: str | None = None
    reproducible_noise: bool = False

    def __call__(self, context: Any) -> Any:
        """The :class:`ClientRuntime` of the node in ``context``."""
        pid = int(context.node_config["partition-id"])
        if self.nodes_dir is not None:
            _note_node(self.nodes_dir, int(context.node_id), pid)
        return _simulated_runtime(self, pid)


@functools.lru_cache(maxsize=4096)
def _note_node(nodes_dir: str, node_id: int, pid: int) -> None:
    """Tell the harness which client a Flower node id plays (for names in round lines)."""
    atomic_write(Path(nodes_dir) / str(node_id), f"client-{pid}".encode(), durable=False)


@functools.lru_cache(maxsize=4)
def _read_secret(path: str) -> bytes:
    """The clients' key bundle, read once per worker process (one bytes object)."""
    return Path(path).read_bytes()


@functools.lru_cache(maxsize=64)
def _simulated_runtime(provider: SimulatedClientProvider, pid: int) -> Any:
    """Build a simulated client's runtime once per worker process, not once per message."""
    import torch

    from sepals.client.core import ClientRuntime
    from sepals.common.data import client_partition

    torch.set_num_threads(1)
    secret = _read_secret(provider.secret_path) if provider.secret_path else None
    common = {
        "client_id": f"client-{pid}",
        "privacy": provider.privacy,
        "encryption": provider.encryption,
        "plan": provider.plan,
        "secret_context": secret,
        "seed": provider.seed,
        "deterministic_noise": provider.reproducible_noise,
        "ledger_path": (
            None if provider.ledger_dir is None else Path(provider.ledger_dir, f"client-{pid}.json")
        ),
    }
    if provider.app is not None:
        app = provider.app.load()
        train_ds, test_ds = app_client_data(
            provider.app, provider.clients, provider.partition, provider.seed, pid
        )
        return ClientRuntime(
            model_factory=app.model_factory,
            train_data=train_ds,
            test_data=test_ds,
            loss_fn=app.loss_fn,
            metric=app.metric,
            metric_name=app.metric_name,
            device=_pick_device(provider.device, app),
            pretrained=None if app.pretrained is None else Path(app.pretrained),
            trainable=app.trainable,
            **common,
        )
    train, test = client_partition(
        provider.dataset, provider.clients, provider.partition, provider.seed, pid
    )
    train_data = train.to_torch()
    canaries = None
    if provider.canaries is not None:
        canaries = provider.canaries.for_client(pid)
        train_data = canaries.add_rows(train_data)
    return ClientRuntime(
        model_factory=dataset_model_factory(provider.dataset),
        train_data=train_data,
        test_data=test.to_torch(),
        device=provider.device,
        canaries=canaries,
        **common,
    )


# --------------------------------------------------------------------------- output
_ANSI = re.compile(r"(\x1b|\?)\[[0-9;]*[A-Za-z]")
REPORT_REASON_CHARS = 300
LINE_REASON_CHARS = 60


def clean_reason(text: str, limit: int = REPORT_REASON_CHARS) -> str:
    """``text`` without ANSI codes or traceback lines, on one line, at most ``limit`` chars."""
    text = _ANSI.sub("", str(text))
    if "Traceback" in text:
        # Keep the exception line, not the stack.
        tail = re.findall(r"([A-Za-z_.]*(?:Error|Exception)\b[^?\n]*)", text)
        text = tail[-1] if tail else text.split("Traceback", 1)[0] or "client failure"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _named(
    pairs: list[tuple[int, str]], names: Callable[[int], str], limit: int = REPORT_REASON_CHARS
) -> list[dict[str, str]]:
    return [{"client": names(n), "reason": clean_reason(reason, limit)} for n, reason in pairs]


def _wait_for_workers(actors: int, timeout: float = 180.0) -> None:
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


# --------------------------------------------------------------------------- run
ProgressFn = Callable[[dict[str, Any]], None]


def simulation_roster(caps: list[int]) -> Any:
    """The node roster of a simulation: client ``client-K`` may claim ``caps[K]`` examples.

    The simulation runs every client itself, so the names the clients claim are true.
    """
    from sepals.server.roster import NodeRoster

    return NodeRoster(
        trust_claimed_names=True,
        caps={f"client-{pid}": cap for pid, cap in enumerate(caps)},
        default_cap=max(caps),
    )


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


def client_resources(cpus: int, on_gpu: bool) -> dict[str, float]:
    """Ray resources of one simulated client: one CPU, and on a GPU an equal share of it.

    Ray runs ``cpus`` clients at once; with ``num_gpus = 1 / cpus`` they all fit on the
    one GPU together (Ray packs fractional GPUs onto a device).
    """
    if cpus < 1:
        raise ValueError(f"cpus must be >= 1, got {cpus}")
    return {"num_cpus": 1.0, "num_gpus": 1.0 / cpus if on_gpu else 0.0}


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
        from sepals.simulations.jobs import pretrained_app  # imports the job's model

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


def he_ring(encryption: EncryptionConfig, vector_length: int) -> dict[str, Any] | None:
    """The report's ring entry: N and ciphertexts per update (``None`` without HE)."""
    if not encryption.enabled:
        return None
    return {
        "poly_modulus_degree": encryption.poly_modulus_degree,
        "ciphertexts_per_update": -(-vector_length // encryption.values_per_ciphertext),
    }


def sign_simulated_rounds(
    strategy: Any, fed: FederationConfig, vector_length: int, checkpoint_sha256: str = ""
) -> Any:
    """Give ``strategy`` a fresh in-memory operator key; return the plan clients follow.

    The plan is made from the strategy's own settings, so the simulated server and its
    clients agree on it; the key never leaves this process.
    """
    operator_private, operator_public = generate_operator_key()
    plan = FederationPlan.create(
        fed,
        strategy.codec.name,
        strategy.codec.fingerprint_hex,
        vector_length,
        operator_public,
        checkpoint_sha256=checkpoint_sha256,
        poly_modulus_degree=strategy.codec.poly_modulus_degree,
    )
    strategy.round_signer = OperatorSigner(operator_private, plan.federation_id)
    return plan


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
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.simulation import run_simulation

    from sepals.client.app import make_client_app
    from sepals.client.training import make_dp_compatible, resolve_device
    from sepals.common.data import client_example_caps
    from sepals.common.records import read_global_record
    from sepals.server.app import ServerSettings, build_strategy, make_server_app
    from sepals.server.strategy import RoundRecord, simulation_node_order
    from sepals.simulations.vce_poller import install as install_vce_poller

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    fed = simulated_federation(config)
    config = dataclasses.replace(config, federation=fed)  # the report shows the settings run
    t_start = time.perf_counter()
    source: AppSource | None = None
    edge: EdgeApp | None = None
    app = fine_tuned_app(config, app)
    if app is not None:
        source = AppSource(pickled=pickle_app(app), cwd=os.getcwd())
    elif config.app is not None:
        source = AppSource(absolute_spec(config.app), tuple(config.app_args), cwd=os.getcwd())
    if source is not None:
        edge = source.load()
        factory = edge.build_model_factory()
        caps = app_caps(
            source,
            config.clients,
            config.partition,
            fed.seed,
            delta=config.privacy.delta if config.privacy.enabled else None,
        )
        metric_name, higher_is_better = edge.metric_name, edge.higher_is_better
    else:
        factory = make_dp_compatible(dataset_model_factory(config.dataset))
        sizes = client_train_sizes(config.dataset, config.clients, config.partition, fed.seed)
        for warning in check_client_sizes(sizes, fed.batch_size):
            log(WARNING, "%s", warning)
        if config.privacy.enabled:
            check_delta(config.privacy.delta, sizes)
        caps = client_example_caps(config.dataset, config.clients, config.partition, fed.seed)
        metric_name, higher_is_better = "accuracy", True
    counts = ParameterCounts.of(factory())
    vector_length = counts.trainable
    # The keys, the plan and the report use the BFV ring sized to the update.
    config = dataclasses.replace(config, encryption=config.encryption.sized_for(vector_length))
    checkpoint = None if edge is None or edge.pretrained is None else Path(edge.pretrained)
    model_info = {
        "parameters": counts.to_dict(),
        "trainable": describe_trainable(None if edge is None else edge.trainable),
        "pretrained": None if checkpoint is None else str(checkpoint),
        "checkpoint_sha256": "" if checkpoint is None else checkpoint_sha256(checkpoint),
        "he_ring": he_ring(config.encryption, vector_length),
    }
    if canaries is not None:
        if source is not None:
            raise ValueError("the privacy audit supports the bundled datasets, not --app")
        if canaries.dimension != vector_length:
            raise ValueError(
                f"canaries of dimension {canaries.dimension} for a {vector_length}-parameter model"
            )
        # A canary is one more example of its client: it may claim it.
        caps = [c + k for c, k in zip(caps, canaries.per_client(config.clients), strict=True)]
    # On a cluster the clients take one CPU each and no GPU, wherever they land.
    device = "cpu" if config.ray_address else _pick_device(config.device, edge)
    on_gpu = resolve_device(device).type == "cuda"
    ctx = multiprocessing.get_context("spawn")
    if config.ray_address is not None:
        check_reachable(config.ray_address)  # before any key exists

    secret_path: str | None = None
    if config.encryption.enabled:
        secret_path = str((out / "keys" / "clients.secret").resolve())
    # One subprocess holds the key: it creates it, then evaluates. Its test data loads
    # while Ray starts; the single worker runs the tasks in order.
    evaluator = cf.ProcessPoolExecutor(1, mp_context=ctx)
    try:
        public_context = evaluator.submit(_evaluator_keys, config.encryption, secret_path).result()
    except BaseException:
        evaluator.shutdown(wait=True, cancel_futures=True)
        raise
    evaluator_ready = evaluator.submit(
        _evaluator_data, config.dataset, source, fed.seed, device, config.clients, config.partition
    )
    cpus = config.cpus or os.cpu_count() or 1
    nodes_dir = tempfile.mkdtemp(prefix=".nodes-", dir=out)
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
        global_model = read_global_record(arrays)
        evaluator_ready.result()  # raises the evaluator's own error, if loading failed
        loss, value, error, per_client = evaluator.submit(
            _evaluator_run, global_model, fed.seed
        ).result()
        if error is not None and error not in eval_errors:
            eval_errors.append(error)
            log(WARNING, "central evaluation failed: %s", error)
        spread = _spread_of(per_client, higher_is_better)
        last_clients.clear()
        last_clients.update(per_client or {})
        metrics = MetricRecord(
            {k: v for k, v in (("loss", loss), (metric_name, value)) if v is not None}
        )
        if server_round == 0:
            initial.update({"loss": loss, "metric": value, "fairness": spread})
            if not custom_metric:
                initial["accuracy"] = value
            _wait_for_workers(cpus if config.ray_address is None else cluster_client_slots())
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
            "clients_accepted": rec.accepted,
            "clients_declined": len(rec.declined),
            "clients_excluded": len(rec.excluded),
            "declined": _named(rec.declined, name_of),
            "excluded": _named(rec.excluded, name_of),
            "federated_accuracy": rec.federated_accuracy,
            "federated_loss": rec.federated_loss,
            "federated_metric": rec.federated_metric,
            "aggregate_seconds": rec.aggregate_seconds,
            "codec": rec.codec,
            "quant_error": rec.quant_error,
            "mask": (
                {
                    "threshold": rec.mask_threshold,
                    "members": rec.mask_members,
                    "survivors": rec.mask_survivors,
                    "dropouts": rec.mask_dropouts,
                    "removed": rec.masks_removed,
                    "abandoned": rec.mask_abandoned,
                    "server_seconds": rec.mask_seconds,
                }
                if rec.masking
                else None
            ),
        }
        rows.append(row)
        if progress is not None:
            progress(row)
        last_time[0] = time.perf_counter()
        return metrics

    settings = ServerSettings(
        federation=fed,
        encryption=config.encryption,
        public_context=public_context,
        vector_length=vector_length,
        on_round=on_round,
        evaluate_fn=evaluate_fn,
        roster=simulation_roster(caps),
    )
    strategy = build_strategy(settings)
    # Sample over stable client ids (client-K), not Flower's random node ids, so a seeded
    # run samples the same clients at any fraction; and wait until every node is there.
    strategy.node_order = simulation_node_order
    strategy.min_available_nodes = config.clients
    strategy.metric_higher_is_better = higher_is_better
    plan = sign_simulated_rounds(strategy, fed, vector_length, model_info["checkpoint_sha256"])
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
            app=source,
            device="cpu" if config.ray_address else config.device,
            nodes_dir=nodes_dir,
            canaries=canaries,
            ledger_dir=str(ledger_dir),
            reproducible_noise=config.reproducible_noise,
        ),
        mods=client_mods,
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
    model_path = out / "model.pt"
    install_vce_poller()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.clients,
                backend_config=backend_config,  # type: ignore[arg-type]
            )
        saved = bool(initial) and evaluator.submit(_evaluator_save, str(model_path)).result()
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
    (out / "report.json").write_text(json.dumps(report, indent=2))
    from sepals.simulations.plots import write_plots

    write_plots(report, out)
    return report


def final_fairness(
    spread: dict[str, Any] | None, per_client: PerClient, metric_name: str
) -> dict[str, Any] | None:
    """``report["final"]["fairness"]``: the final model on the clients' own test splits.

    The spread (see :class:`sepals.common.fairness.ClientSpread`), the metric's name and
    every client's value (``clients``, client id -> value); ``None`` without test data.
    """
    if spread is None or not per_client:
        return None
    ordered = sorted(per_client.items(), key=lambda kv: int(kv[0].rsplit("-", 1)[-1]))
    return {**spread, "metric": metric_name, "clients": dict(ordered)}


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
                "epsilon_replace_one": c.epsilon_replace_one,
                "delta": c.delta,
                "noise_multiplier": c.noise_multiplier,
                "sample_rate": c.sample_rate,
                "steps": c.total_steps,
                "num_examples": c.num_examples,
                "accountant": c.accountant if c.epsilon is not None else None,
            }
    last = rows[-1] if rows else {}
    eps_values = [c["epsilon"] for c in clients.values() if c["epsilon"] is not None]
    eps_r1 = [
        c["epsilon_replace_one"] for c in clients.values() if c["epsilon_replace_one"] is not None
    ]
    return {
        "config": {**config.to_dict(), "codec": codec, "model_parameters": vector_length},
        "rounds": rows,
        "final": {
            "accuracy": last.get("accuracy"),
            "loss": last.get("loss"),
            "epsilon": max(eps_values) if eps_values else None,
            "epsilon_replace_one": max(eps_r1) if eps_r1 else None,
            "noise_source": (
                None
                if not config.privacy.enabled
                else "seeded from the run's seed (reproducible tests only: predictable noise)"
                if config.reproducible_noise
                else "os.urandom: each DP-SGD step's generator seeded afresh"
            ),
            "federated_evaluation": config.federation.evaluation_disclosure,
            "ledgers": LEDGER_DIR,
            **_noise_shares_summary(config, list(clients.values())),
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


def _noise_shares_summary(
    config: SimulationConfig, clients: list[dict[str, Any]]
) -> dict[str, Any]:
    """Under distributed noise: ``m`` and the largest epsilon of one client's lone update.

    The reported epsilon holds for aggregates of at least ``m`` honest clients; a lone
    update carries ``sigma / sqrt(m)`` only. Its epsilon is composed with RDP (an upper
    bound, and fast at the small sigma where PLD is slow).
    """
    shares = config.federation.noise_shares
    if shares == 1 or not config.privacy.enabled:
        return {}
    from sepals.client.privacy import compute_epsilon

    lone = [
        compute_epsilon(
            "rdp",
            ((c["noise_multiplier"] / math.sqrt(shares), c["sample_rate"], c["steps"]),),
            config.privacy.delta,
        )
        for c in clients
        if c["epsilon"] is not None and c["steps"]
    ]
    return {"noise_shares": shares, "lone_update_epsilon": max(lone, default=None)}


def summarize(report: dict[str, Any]) -> str:
    """One line about a finished run."""
    f = report["final"]
    eps = f["epsilon"]
    qerr = f.get("max_quant_error")
    name = f.get("metric_name", "accuracy")
    value = f.get("metric", f.get("accuracy"))
    if value is None:
        shown = f"final {name} n/a"
    elif name == "accuracy":
        shown = f"final accuracy {100 * value:.2f}%"
    else:
        shown = f"final {name} {value:.4f}"
    if eps is not None and f.get("noise_shares"):
        lone = f.get("lone_update_epsilon")
        shown_eps = (
            f"{eps:.3f} for sums of >= {f['noise_shares']} clients (a lone update: "
            f"{'n/a' if lone is None else f'{lone:.1f}'})"
        )
    else:
        shown_eps = "off" if eps is None else f"{eps:.3f}"
    replace_one = f.get("epsilon_replace_one")
    if eps is not None and replace_one is not None:
        shown_eps += f" (replace-one {replace_one:.3f})"
    fairness = format_spread(f.get("fairness"), name)
    if fairness:
        shown += f" | {fairness}"
    return (
        f"{shown} | epsilon {shown_eps} | {f['wall_seconds']:.1f} s | "
        f"up {f['upload_bytes'] / 1e6:.2f} MB, down {f['download_bytes'] / 1e6:.2f} MB | "
        f"codec {f.get('codec', '?')}, max quantization error "
        f"{'n/a' if qerr is None else f'{qerr:.1e}'}{_masking_summary(f.get('masking'))}"
    )


def _masking_summary(masking: dict[str, Any] | None) -> str:
    if not masking:
        return ""
    return (
        f" | masking k={masking['neighbours']} T={masking['threshold']}, masks removed in "
        f"{masking['rounds_masks_removed']} rounds"
    )
