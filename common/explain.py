"""Attributions of any sepals model with Captum, and the per-example vectors of a release.

:func:`attribute` explains a model's output for a batch of inputs with one of Captum's
methods (:data:`~sepals.common.explain_spec.METHODS`): Integrated Gradients, Saliency
(the signed gradient), GradientSHAP, KernelSHAP or LIME. Float inputs are attributed
value by value (an image's pixels, a table's features); integer inputs are token ids,
attributed on the model's first ``nn.Embedding`` with Captum's
``LayerIntegratedGradients`` and summed over the embedding, one value per token.

:func:`attribution_rows` turns a batch into what a federated explanation sums: every
example's attributions for every target output, flattened into one vector, which
:func:`clip_rows` clips to the norm ``C_e``. Captum is imported where it is used, so
processes that never explain never load it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from sepals.common.explain_spec import DEFAULT_LOCAL_METHOD, METHODS

#: Examples attributed per Captum call (Integrated Gradients multiplies it by its steps).
CHUNK = 64


def is_token_input(inputs: torch.Tensor) -> bool:
    """Whether ``inputs`` are token ids (integers), attributed per token."""
    return not (inputs.is_floating_point() or inputs.is_complex())


def embedding_layer(model: nn.Module) -> nn.Module:
    """The model's first ``nn.Embedding``, where token inputs are attributed.

    Raises:
        ValueError: the model has none.

    """
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module
    raise ValueError(
        "integer (token) inputs are attributed on an nn.Embedding layer, and this model has "
        "none; pass float inputs or the layer"
    )


def scores(output: Any) -> torch.Tensor:
    """A model's output as a ``(batch, outputs)`` tensor of scores.

    A Hugging Face output's ``logits``; a sequence of scores ``(batch, tokens, V)`` is
    taken at its last position (the next-token prediction); a vector is one output.
    """
    out = getattr(output, "logits", output)
    if isinstance(out, tuple | list):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model returned {type(out).__name__}, not a tensor of scores")
    if out.dim() == 1:
        return out.unsqueeze(1)
    if out.dim() == 3:
        return out[:, -1, :]
    if out.dim() != 2:
        raise ValueError(f"cannot attribute a model output of shape {tuple(out.shape)}")
    return out


def forward_scores(model: nn.Module) -> Callable[..., torch.Tensor]:
    """``model``'s forward pass, returning :func:`scores`."""

    def forward(*args: Any) -> torch.Tensor:
        return scores(model(*args))

    return forward


def output_count(model: nn.Module, example: torch.Tensor) -> int:
    """How many scores the model gives for one example (the classes of a classifier)."""
    with torch.no_grad():
        return int(scores(model(example[:1])).shape[1])


def feature_count(example: torch.Tensor) -> int:
    """Attribution values per example and target: input values, or tokens."""
    shape = tuple(example.shape[1:])
    if is_token_input(example):
        return int(shape[0]) if shape else 1
    return int(np.prod(shape)) if shape else 1


def _check_method(method: str, tokens: bool) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if tokens and method != "integrated_gradients":
        raise ValueError(
            "token inputs are attributed with integrated_gradients on the embedding layer, "
            f"not {method}"
        )


def attribute(
    model: nn.Module,
    inputs: torch.Tensor,
    target: int | torch.Tensor | None = None,
    *,
    method: str = DEFAULT_LOCAL_METHOD,
    baselines: torch.Tensor | None = None,
    steps: int = 32,
    layer: nn.Module | None = None,
) -> torch.Tensor:
    """Captum attributions of ``model``'s score ``target`` for a batch of ``inputs``.

    Args:
        model: Any torch module (put in eval mode here; its weights are not changed).
        inputs: A batch: float values (any shape after the batch dimension) or token ids
            ``(batch, tokens)``.
        target: The output index to explain: one for all, or one per example;
            ``None`` for a model with a single output.
        method: One of :data:`~sepals.common.explain_spec.METHODS`.
        baselines: The reference input (Integrated Gradients, KernelSHAP, LIME) or
            reference distribution (GradientSHAP); default zeros (token id 0).
        steps: Integration steps, samples or perturbations per example.
        layer: Token inputs: the embedding layer (default: the first ``nn.Embedding``).

    Returns:
        The attributions: the shape of ``inputs`` for float inputs, ``(batch, tokens)``
        for token inputs, on the CPU, detached.

    Raises:
        ValueError: an unknown method, or one that does not apply to the inputs.

    """
    ca = captum_attr()
    tokens = is_token_input(inputs)
    _check_method(method, tokens)
    model.eval()
    forward = forward_scores(model)
    if tokens:
        lig = ca.LayerIntegratedGradients(forward, layer or embedding_layer(model))
        base = torch.zeros_like(inputs) if baselines is None else baselines
        out = lig.attribute(inputs, baselines=base, target=target, n_steps=steps)
        return out.sum(dim=-1).detach().cpu()  # type: ignore[no-any-return]
    x = inputs.detach().clone().requires_grad_(True)
    base = torch.zeros_like(inputs[:1]) if baselines is None else baselines
    result: torch.Tensor
    if method == "integrated_gradients":
        result = ca.IntegratedGradients(forward).attribute(
            x, baselines=base, target=target, n_steps=steps
        )
    elif method == "saliency":
        result = ca.Saliency(forward).attribute(x, target=target, abs=False)
    elif method == "gradient_shap":
        result = ca.GradientShap(forward).attribute(
            x, baselines=base, target=target, n_samples=steps, stdevs=0.0
        )
    else:
        result = _perturbation(ca, method, forward, x, base, target, steps)
    return result.detach().cpu()


def _perturbation(
    ca: Any,
    method: str,
    forward: Callable[..., torch.Tensor],
    x: torch.Tensor,
    base: torch.Tensor,
    target: int | torch.Tensor | None,
    steps: int,
) -> torch.Tensor:
    """KernelSHAP or LIME, one example at a time (each fits its own surrogate model)."""
    explainer = ca.KernelShap(forward) if method == "kernel_shap" else ca.Lime(forward)
    rows = []
    for i in range(x.shape[0]):
        one_target = target[i : i + 1] if isinstance(target, torch.Tensor) else target
        one_base = base[i : i + 1] if base.shape[0] == x.shape[0] else base[:1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Captum's notes on surrogate-model fitting
            rows.append(
                explainer.attribute(
                    x[i : i + 1].detach(),
                    baselines=one_base,
                    target=one_target,
                    n_samples=max(steps, 8),
                    perturbations_per_eval=max(steps, 8),
                )
            )
    return torch.cat(rows)


def attribution_rows(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: int,
    *,
    method: str,
    steps: int,
) -> npt.NDArray[np.float64]:
    """Every example's attributions for each of ``targets`` outputs, one row per example.

    Row ``i`` is ``[a_0(x_i), ..., a_{K-1}(x_i)]``, each ``a_k`` flattened; so summing rows
    gives per-target (per-class) maps, every example counting for every target.
    """
    if targets < 1:
        raise ValueError(f"targets must be >= 1, got {targets}")
    parts = []
    for start in range(0, inputs.shape[0], CHUNK):
        chunk = inputs[start : start + CHUNK]
        per_target = []
        for k in range(targets):
            a = attribute(model, chunk, k, method=method, steps=steps)
            per_target.append(a.reshape(chunk.shape[0], -1).to(torch.float64))
        parts.append(torch.cat(per_target, dim=1).numpy())
    if not parts:
        return np.zeros((0, 0))
    return np.concatenate(parts)


def clip_rows(
    rows: npt.NDArray[np.float64], clip: float, blocks: int = 1
) -> npt.NDArray[np.float64]:
    """Each row clipped to L2 norm ``clip``, each of its ``blocks`` to ``clip/sqrt(blocks)``.

    A row's blocks are its targets' attributions. Clipping each target's block to the
    same share keeps the row within ``clip`` (so one example still moves a sum by at most
    ``clip``) and lets every target count equally: no class's map is drowned by another's
    larger attributions. A block within its share is unchanged.
    """
    n = rows.shape[0]
    split = rows.reshape(n, blocks, -1)
    norms = np.linalg.norm(split, axis=2, keepdims=True)
    scale = np.minimum(1.0, (clip / np.sqrt(blocks)) / np.maximum(norms, 1e-300))
    return np.asarray((split * scale).reshape(n, -1), dtype=np.float64)


def load_captum() -> None:
    """Import Captum now (about a second: it loads matplotlib), not in a timed round.

    Without Captum installed this does nothing: training goes on, and an explanation
    round fails on its own with :func:`captum_attr`'s message.
    """
    with contextlib.suppress(ValueError):
        captum_attr()


def captum_attr() -> Any:
    """Captum's ``captum.attr``.

    Raises:
        ValueError: Captum is not installed (``pip install 'sepals[explain]'``).

    """
    try:
        import captum.attr
    except ImportError as exc:
        raise ValueError(
            "explanations need Captum: pip install 'sepals[explain]' (or captum>=0.9,<0.10)"
        ) from exc
    return captum.attr
