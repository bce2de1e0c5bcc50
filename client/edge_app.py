""":class:`EdgeApp`: the one description of a client, and loading it from an import spec.

The same object an edge app hands the SDK is what a simulation runs: its model factory,
data, privacy budget, and optionally its own loss, metric, device, pretrained
checkpoint and what to train.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from sepals.client.core import ClientRuntime
from sepals.client.explain_local import Explanation, explain
from sepals.client.training import DEVICE_CHOICES, LossFn, MetricFn, model_builder
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.finetune import TrainableSpec, check_trainable
from sepals.common.models import ModelFactory
from sepals.common.plan import FederationPlan


def as_dataset(data: Dataset | DataLoader | None) -> Dataset | None:  # type: ignore[type-arg]
    """The dataset of ``data`` (a DataLoader's own dataset), or ``data`` itself."""
    if isinstance(data, DataLoader):
        return data.dataset  # type: ignore[no-any-return]
    return data


ClientDataFn = Callable[[int, int], "tuple[Dataset[Any], Dataset[Any] | None]"]


@dataclass(frozen=True)
class EdgeApp:
    """What an edge app brings to a federation, deployed or simulated.

    Attributes:
        model_factory: Builds a fresh, untrained model. Every client of a federation must
            build the same architecture; BatchNorm is replaced by GroupNorm for DP-SGD.
        train_data: Training data: a torch ``Dataset`` of ``(x, y)`` pairs, or a
            ``DataLoader`` (its dataset is used; batching is set by the federation,
            because DP-SGD samples batches itself). In a simulation it is split among
            the clients (``--partition``). May be ``None`` only when ``client_data``
            is given.
        test_data: Optional test data: a client's local test data for federated
            evaluation; in a simulation, the held-out set of the central evaluation,
            also split IID among the clients for federated evaluation.
        privacy: This client's (epsilon, delta) budget and clipping norm.
        loss_fn: The loss, ``loss_fn(output, target)`` returning the MEAN over the batch
            as a 0-dim tensor (e.g. ``torch.nn.functional.mse_loss``); DP-SGD scales
            per-sample gradients for a mean. ``None``: cross-entropy.
        metric: The evaluation metric, ``metric(outputs, targets)`` over the whole
            evaluation set (CPU tensors) -> float. ``None``: accuracy.
        metric_name: The metric's name in reports (``accuracy`` by default).
        higher_is_better: Whether a larger metric is better (``False`` for an error).
        client_data: Simulation only: ``client_data(client, clients)`` returns client
            ``client``'s ``(train, test-or-None)`` datasets, instead of splitting
            ``train_data``.
        device: Where this app trains: ``auto`` (CUDA when torch sees one), ``cpu`` or
            ``cuda``. A simulation's ``--device`` other than ``auto`` overrides it.
        pretrained: A local pretrained checkpoint that round 1 starts from, instead of
            a seeded random model. A file is a ``state_dict`` (``torch.save(model.
            state_dict(), path)``, or ``.safetensors``) loaded into ``model_factory()``;
            for a directory (a Hugging Face ``save_pretrained`` folder) the model is
            ``model_factory(path)``, e.g. ``from_pretrained(path)``, never a hub name.
            Every party loads it the same way; its SHA-256 is in the federation's plan
            and a client whose copy differs refuses to train. The model must be
            DP-compatible as saved (GroupNorm, not BatchNorm).
        trainable: What the federation trains: ``None`` (every parameter the model
            leaves trainable), parameter-name patterns such as ``("head.*",)``, or
            :class:`sepals.common.finetune.LoRA` adapters. Only these parameters get
            per-sample gradients, DP noise, encryption and aggregation; the rest stay
            frozen on the client and cost no upload.

    """

    model_factory: Callable[..., Any]
    train_data: Dataset | DataLoader | None = None  # type: ignore[type-arg]
    test_data: Dataset | DataLoader | None = None  # type: ignore[type-arg]
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    loss_fn: LossFn | None = None
    metric: MetricFn | None = None
    metric_name: str = "accuracy"
    higher_is_better: bool = True
    client_data: ClientDataFn | None = None
    device: str = "auto"
    pretrained: str | Path | None = None
    trainable: TrainableSpec = None

    def __post_init__(self) -> None:
        if not callable(self.model_factory):
            raise ValueError("model_factory must be a callable that returns a torch module")
        for name in ("loss_fn", "metric", "client_data"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise ValueError(f"{name} must be callable or None")
        if not isinstance(self.metric_name, str) or not self.metric_name.strip():
            raise ValueError("metric_name must be a non-empty string")
        if self.metric is not None and self.metric_name == "accuracy":
            raise ValueError("an app with its own metric must name it (metric_name)")
        if self.device not in DEVICE_CHOICES and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        train = as_dataset(self.train_data)
        if train is None and self.client_data is None:
            raise ValueError("train_data must hold at least one example (or give client_data)")
        if train is not None and len(train) == 0:  # type: ignore[arg-type]
            raise ValueError("train_data must hold at least one example")
        object.__setattr__(self, "trainable", check_trainable(self.trainable))
        if self.pretrained is not None:
            path = Path(self.pretrained).expanduser()
            if not path.exists():
                raise ValueError(f"pretrained checkpoint {path} does not exist")
            object.__setattr__(self, "pretrained", path.resolve())

    def build_model_factory(self) -> ModelFactory:
        """The factory of the model this app trains: checkpoint loaded, trainable part set.

        Clients, the simulation's evaluator and the benchmarks all build it with this.
        """
        return model_builder(self.model_factory, self.pretrained, self.trainable)

    @property
    def train_dataset(self) -> Dataset | None:  # type: ignore[type-arg]
        """``train_data`` as a ``Dataset`` (``None`` if the app gives only ``client_data``)."""
        return as_dataset(self.train_data)

    @property
    def test_dataset(self) -> Dataset | None:  # type: ignore[type-arg]
        """``test_data`` as a ``Dataset``, or ``None``."""
        return as_dataset(self.test_data)

    def explain(self, inputs: torch.Tensor, target: Any = None, **options: Any) -> Explanation:
        """Explain this app's model for ``inputs`` here, sending nothing (``sepals.explain``)."""
        return explain(self, inputs, target, **options)


def gathered(data: Dataset) -> Dataset:  # type: ignore[type-arg]
    """``data``, with a ``Subset`` of a ``TensorDataset`` gathered into its own tensors.

    The training loader fetches a ``TensorDataset``'s batches whole (one indexing per
    tensor), so a client's share of an app's tensors trains as fast as bundled data.
    """
    if isinstance(data, Subset) and type(data.dataset) is TensorDataset:
        idx = torch.as_tensor(list(data.indices), dtype=torch.long)
        return TensorDataset(*(t[idx] for t in data.dataset.tensors))
    return data


def build_runtime(
    app: EdgeApp,
    *,
    client_id: str,
    train_data: Dataset,  # type: ignore[type-arg]
    test_data: Dataset | None,  # type: ignore[type-arg]
    encryption: EncryptionConfig,
    plan: FederationPlan,
    secret_context: bytes | None,
    ledger_path: Path | None,
    privacy: PrivacyConfig | None = None,
    device: str | None = None,
    reproducible_seed: int | None = None,
) -> ClientRuntime:
    """What runs for ``app`` as client ``client_id``: the one way every path builds a client.

    The edge SDK, a simulated client (own app or bundled dataset), ``flwr run`` and a
    privacy audit all call this; only where the data and the keys come from differs.

    Args:
        app: The client's description.
        client_id: The client's name in reports and ledgers.
        train_data: This client's training data (the app's own, or its simulated share,
            possibly wrapped with an audit's canaries).
        test_data: This client's evaluation data, or ``None``.
        encryption: The federation's encryption settings.
        plan: The federation's plan.
        secret_context: The serialized secret context (``None`` without encryption).
        ledger_path: The client's privacy ledger file (``None``: in Flower's state).
        privacy: Overrides ``app.privacy`` (a simulation's budget; ``None`` keeps it).
        device: Overrides ``app.device`` (``None`` keeps it).
        reproducible_seed: TESTS ONLY: derive the DP randomness from this seed, which
            voids the epsilon (see :class:`ClientRuntime`).

    """
    return ClientRuntime(
        client_id=client_id,
        model_factory=app.model_factory,
        train_data=gathered(train_data),
        test_data=None if test_data is None else gathered(test_data),
        privacy=app.privacy if privacy is None else privacy,
        encryption=encryption,
        plan=plan,
        secret_context=secret_context,
        reproducible_seed=reproducible_seed,
        ledger_path=ledger_path,
        loss_fn=app.loss_fn,
        metric=app.metric,
        metric_name=app.metric_name,
        device=app.device if device is None else device,
        pretrained=None if app.pretrained is None else Path(app.pretrained),
        trainable=app.trainable,
    )


def import_target(target: str) -> Any:
    """Import the module of ``module`` or ``path/to/file.py``.

    Raises:
        ValueError: it cannot be found or raised while being imported.

    """
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"no such file: {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        try:
            module_spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:
            sys.modules.pop(path.stem, None)
            raise ValueError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise ValueError(f"no module named {exc.name or target!r}") from exc
    except (Exception, SystemExit) as exc:
        raise ValueError(f"importing {target} failed: {type(exc).__name__}: {exc}") from exc


def load_edge_app(spec: str, kwargs: Mapping[str, str] | None = None) -> EdgeApp:
    """Import ``module:attr`` or ``path/to/file.py:attr`` and return its :class:`EdgeApp`.

    ``attr`` is an :class:`EdgeApp` or a callable returning one; a callable receives
    ``kwargs`` as keyword arguments (strings).

    Raises:
        ValueError: one line for every way this can fail: a malformed spec, a module
            that is missing or raises on import, a missing attribute, a factory that
            rejects its arguments or raises, or a result that is not an ``EdgeApp``.

    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"app must be 'module:attr' or 'file.py:attr', got {spec!r}")
    module = import_target(target)
    try:
        obj = getattr(module, attr)
    except AttributeError as exc:
        raise ValueError(f"{target} has no attribute {attr!r}") from exc
    if callable(obj) and not isinstance(obj, EdgeApp):
        try:
            obj = obj(**dict(kwargs or {}))
        except (Exception, SystemExit) as exc:
            args = ", ".join(f"{k}={v!r}" for k, v in (kwargs or {}).items()) or "no arguments"
            raise ValueError(
                f"{spec} failed with {args}: {type(exc).__name__}: {exc}".replace("\n", " ")
            ) from exc
    elif kwargs:
        raise ValueError(f"{spec} is not callable, so it takes no app arguments")
    if not isinstance(obj, EdgeApp):
        raise ValueError(f"{spec} gave a {type(obj).__name__}, not a sepals EdgeApp")
    return obj
