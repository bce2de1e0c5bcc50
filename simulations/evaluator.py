"""The central evaluator: a subprocess that holds the secret key and scores each model.

It decrypts each round's global model and measures loss and the metric on the held-out
test split, overall and per client; the server never sees its inputs in the clear.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader

from sepals.client.training import evaluate_model, resolve_device
from sepals.common.config import EncryptionConfig
from sepals.common.files import atomic_write
from sepals.common.model_changes import SAVED_MODEL_NOTE
from sepals.common.models import set_flat
from sepals.common.protocol import decode_global_model
from sepals.common.records import GlobalModel
from sepals.common.scheme import make_client_codec, public_context_bytes
from sepals.simulations.app_data import app_client_data, client_test_owner
from sepals.simulations.config import AppSource
from sepals.simulations.keys import write_secret_context
from sepals.simulations.reasons import clean_reason

_EVAL_STATE: dict[str, Any] = {}


def eval_state() -> dict[str, Any]:
    """The evaluator process's state: its model factory, test data and latest model."""
    return _EVAL_STATE


def evaluator_data(app: AppSource, seed: int, device: str, clients: int, partition: str) -> None:
    """Evaluator (subprocess): load the model factory and the test data.

    That is the app's held-out test data and the clients' own test data. Where every
    client's test data is known to be rows of the held-out data and the loss and metric
    are the defaults (a bundled dataset, or an app whose test data sepals splits), one
    pass over the held-out data scores them all.
    """
    edge = app.load()
    _EVAL_STATE["device"] = device
    _EVAL_STATE["factory"] = edge.build_model_factory()
    _EVAL_STATE["test"] = edge.test_dataset
    _EVAL_STATE["loss_fn"], _EVAL_STATE["metric"] = edge.loss_fn, edge.metric
    _EVAL_STATE["owner"] = None
    _EVAL_STATE["client_tests"] = []
    if edge.loss_fn is None and edge.metric is None:
        _EVAL_STATE["owner"] = client_test_owner(app, clients, partition, seed)
    if _EVAL_STATE["owner"] is None:
        tests = [(k, app_client_data(app, clients, partition, seed, k)[1]) for k in range(clients)]
        _EVAL_STATE["client_tests"] = [
            (f"client-{k}", ds) for k, ds in tests if ds is not None and len(ds) > 0
        ]


PerClient = dict[str, float]
"""A metric's value per client id (``client-K``)."""


def evaluator_run(
    global_model: GlobalModel | None, model_seed: int
) -> tuple[float | None, float | None, str | None, PerClient | None]:
    """Evaluator (subprocess): decrypt a global model, keep it, evaluate it.

    Returns ``(loss, metric, error, per_client)``: the loss and metric on the held-out
    test split, and the metric on every client's own test split (``None`` without any;
    clients without test data are left out). Without test data, the model is still
    decrypted and kept, and loss and metric are ``None``; so they are when the app's
    loss or metric fails (``error`` says why).
    """
    factory = _EVAL_STATE["factory"]
    weights = decode_global_model(_EVAL_STATE["codec"], factory, global_model, model_seed)
    _EVAL_STATE["latest"] = weights
    owner = _EVAL_STATE.get("owner")
    if _EVAL_STATE["test"] is not None and owner is not None:
        try:
            loss, value, grouped = grouped_accuracy(
                factory, weights, _EVAL_STATE["test"], owner, _EVAL_STATE["device"]
            )
        except Exception as exc:  # an app's model whose outputs are not class scores
            return None, None, clean_reason(f"{type(exc).__name__}: {exc}"), None
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


def grouped_accuracy(
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


def evaluator_save(path: str, note: dict[str, Any] | None = None) -> str:
    """Evaluator (subprocess): write the latest decrypted global model's ``state_dict``.

    ``note`` (how the model was built: replaced layers, how to rebuild it) travels in
    the file, as the ``state_dict``'s ``_metadata`` entry
    :data:`~sepals.common.model_changes.SAVED_MODEL_NOTE`, which loading ignores.
    """
    model = _EVAL_STATE["factory"]()
    set_flat(model, _EVAL_STATE["latest"])
    state = model.state_dict()
    saved = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
    metadata = dict(getattr(state, "_metadata", {}))
    if note is not None:
        metadata[SAVED_MODEL_NOTE] = note
    saved._metadata = metadata  # type: ignore[attr-defined]
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    atomic_write(Path(path), buffer.getvalue())
    return path


def evaluator_keys(encryption: EncryptionConfig, secret_path: str | None) -> bytes | None:
    """Evaluator (subprocess): create the HE keys (if on) and keep the clients' codec.

    Returns the public context for the server, ``None`` without encryption. The secret
    key leaves this process only in the 0600 key file the simulated clients read.
    """
    torch.set_num_threads(1)
    public = None
    secret = None
    if encryption.enabled:
        if secret_path is None:
            raise ValueError("encryption is on but no key file path was given")
        secret = write_secret_context(encryption, secret_path)
        public = public_context_bytes(secret)
    _EVAL_STATE["codec"] = make_client_codec(encryption, secret)
    return public
