"""Local explanations on the device: nothing is sent, nothing is spent.

:func:`explain` (``sepals.explain``, and :meth:`EdgeApp.explain`) attributes a model's
prediction for the caller's own inputs with Captum, in the caller's process: the
inputs, the model and the attributions never leave it, so no privacy budget is used.
It takes an :class:`~sepals.client.edge_app.EdgeApp` (its model is built the way every
client builds it, with its checkpoint; pass ``weights`` to explain, say, a decrypted
global model or a run's ``model.pt``) or any torch module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from sepals.common.explain import attribute, feature_count, is_token_input, scores
from sepals.common.explain_plot import plot_maps
from sepals.common.explain_spec import DEFAULT_LOCAL_METHOD
from sepals.common.models import set_flat


@dataclass(frozen=True)
class Explanation:
    """Attributions of a model's prediction for a batch of inputs.

    Attributes:
        attributions: One row per input: the input's shape for float inputs (an image's
            pixels, a table's features), one value per token for token inputs.
        targets: The explained output of each input.
        predictions: The model's top output for each input.
        method: The Captum method used.

    """

    attributions: npt.NDArray[np.float64]
    targets: tuple[int, ...]
    predictions: tuple[int, ...]
    method: str

    def plot(
        self,
        path: str | Path,
        *,
        index: int = 0,
        image_shape: tuple[int, int] | None = None,
        feature_names: Sequence[str] | None = None,
    ) -> Path:
        """Draw input ``index``'s attributions into a PNG: a heat map or bars.

        An input of two or more dimensions is a heat map (channels summed); a flat one
        is a heat map only with ``image_shape``, else the most important features as
        bars (``feature_names`` label them; tokens, say).
        """
        row = self.attributions[index]
        shape = image_shape
        if shape is None and row.ndim >= 2:
            shape = (int(row.shape[-2]), int(row.shape[-1]))
            row = row.reshape(-1, *shape).sum(axis=0)
        flat = row.reshape(1, -1)
        title = f"{self.method}: target {self.targets[index]}"
        return plot_maps(
            Path(path),
            {"attribution": flat},
            image_shape=shape,
            feature_names=feature_names,
            title=title,
        )


def _model_of(app_or_model: Any, weights: Any) -> nn.Module:
    """The module to explain: an app's model (checkpoint loaded) or the module given."""
    if isinstance(app_or_model, nn.Module):
        model = app_or_model
    elif hasattr(app_or_model, "build_model_factory"):  # an EdgeApp
        model = app_or_model.build_model_factory()()
    else:
        raise ValueError(
            f"explain needs an EdgeApp or a torch module, got {type(app_or_model).__name__}"
        )
    if isinstance(weights, str | Path):
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(weights, Mapping):
        try:
            model.load_state_dict(dict(weights))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise ValueError(f"the weights do not fit this model: {first}") from exc
    elif weights is not None:
        set_flat(model, np.asarray(weights, dtype=np.float64))
    return model


def explain(
    app_or_model: Any,
    inputs: torch.Tensor,
    target: int | Sequence[int] | None = None,
    *,
    method: str = DEFAULT_LOCAL_METHOD,
    weights: Any = None,
    baselines: torch.Tensor | None = None,
    steps: int = 32,
) -> Explanation:
    """Explain a model's predictions for ``inputs`` on this device; nothing is sent.

    Args:
        app_or_model: An :class:`~sepals.client.edge_app.EdgeApp` or a torch module.
        inputs: A batch of inputs (float values, or token ids ``(batch, tokens)``); a
            single example without its batch dimension is accepted for float inputs
            of a model that takes flat vectors.
        target: The output to explain, for all inputs or one per input; ``None``: each
            input's top prediction.
        method: ``integrated_gradients`` (default), ``saliency``, ``gradient_shap``,
            ``kernel_shap`` or ``lime``; token inputs take ``integrated_gradients`` on
            the model's embedding layer.
        weights: The weights to explain: a ``state_dict``, a path to one (a run's
            ``model.pt``), or a flat vector of the trainable parameters; ``None`` keeps
            the model's own (for an app: its checkpoint, or a fresh model).
        baselines: The reference input (default zeros) or, for GradientSHAP, reference
            examples.
        steps: Integration steps, samples or perturbations per input.

    Raises:
        ValueError: an unknown method, or inputs the model or method cannot take.

    """
    model = _model_of(app_or_model, weights)
    model.eval()
    batch = inputs if inputs.dim() > 1 or is_token_input(inputs) else inputs.unsqueeze(0)
    with torch.no_grad():
        top = scores(model(batch)).argmax(dim=1)
    if target is None:
        chosen = top
    elif isinstance(target, int):
        chosen = torch.full_like(top, target)
    else:
        chosen = torch.as_tensor(list(target), dtype=torch.long)
    if chosen.shape != top.shape:
        raise ValueError(f"{len(chosen)} targets for {len(top)} inputs")
    values = attribute(model, batch, chosen, method=method, baselines=baselines, steps=steps).to(
        torch.float64
    )
    if values.shape[0] != batch.shape[0] or feature_count(batch) != values[0].numel():
        raise ValueError("attributions do not match the inputs")
    return Explanation(
        attributions=values.numpy(),
        targets=tuple(int(t) for t in chosen),
        predictions=tuple(int(t) for t in top),
        method=method,
    )
