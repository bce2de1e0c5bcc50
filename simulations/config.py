"""The settings of one simulation run, and where its clients' app comes from.

:class:`SimulationConfig` is every setting of a run; :class:`AppSource` names an
:class:`~sepals.client.edge.EdgeApp` (an import spec or a pickled object) so that each
simulated client process can rebuild the same app.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.data import check_dataset_name
from sepals.common.federation import FederationConfig, sampled_per_round
from sepals.common.finetune import check_trainable
from sepals.common.partition import PartitionSpec, check_partition
from sepals.simulations.ray_cluster import parse_ray_address

if TYPE_CHECKING:
    from sepals.client.edge_app import EdgeApp


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
        insecure_reproducible: TESTS ONLY. Derive every client's DP sampling, noise and
            rounding from the run's seed, so that a run repeats exactly. Anyone who knows
            the seed can then replay the batches and subtract the noise: the reported
            epsilon does NOT hold, and the report and summary line say so. By default
            each DP-SGD step draws its batch and its noise under fresh keys from the
            kernel's CSPRNG (:mod:`sepals.client.secret_random`).
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
    insecure_reproducible: bool = False
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.app is None:
            check_dataset_name(self.dataset)
            check_partition(self.dataset, self.partition)
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")

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
        # This module loads with the CLI, before its flags are parsed: the client's
        # training module (and Flower) load when a config is made, and an app when used.
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
        return load_app(self)


BUNDLED_JOB_SPEC = "sepals.simulations.jobs:bundled_job"
"""The spec of a bundled dataset's app (:func:`sepals.simulations.jobs.bundled_app`)."""


def bundled_source(dataset: str, clients: int, partition: str, seed: int) -> AppSource:
    """The :class:`AppSource` of bundled ``dataset`` split among ``clients`` clients."""
    args = (("dataset", dataset), ("clients", str(clients)), ("partition", partition))
    return AppSource(BUNDLED_JOB_SPEC, (*args, ("seed", str(seed))))


@functools.lru_cache(maxsize=4)
def load_app(source: AppSource) -> EdgeApp:
    """The :class:`EdgeApp` that ``source`` names (cached per process: a worker loads it once)."""
    from sepals.client.edge_app import EdgeApp, load_edge_app  # see __post_init__

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
