"""Pictures of attributions: heat maps for image-like inputs, bars for features or tokens.

Both the local explanation of one input (:meth:`sepals.client.explain_local.Explanation.plot`)
and a simulation's federated explanation (``explanation.png`` in the run folder) are
drawn here. Each *map* is a ``(targets, features)`` array; several maps (the private
federated one and the central non-private one, say) are drawn row by row so that they
can be compared. matplotlib is imported where it is used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

#: Most features shown as bars (the largest by importance).
TOP_FEATURES = 20


def importance(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Per-feature importance of a ``(targets, features)`` map: its norm over targets."""
    return np.asarray(np.linalg.norm(np.atleast_2d(rows), axis=0), dtype=np.float64)


def plot_maps(
    path: Path,
    maps: Mapping[str, npt.NDArray[np.float64]],
    *,
    image_shape: tuple[int, int] | None = None,
    target_names: Sequence[str] | None = None,
    feature_names: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Draw ``maps`` (name -> ``(targets, features)``) into the PNG file ``path``.

    With ``image_shape`` (``(height, width)`` whose product is the feature count), every
    target of every map is a heat map (red: raises the score; blue: lowers it), one row
    per map; otherwise the :data:`TOP_FEATURES` most important features (by the first
    map's :func:`importance`) are bars, one group per map.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = {name: np.atleast_2d(np.asarray(m, dtype=np.float64)) for name, m in maps.items()}
    if not arrays:
        raise ValueError("nothing to plot")
    targets, features = next(iter(arrays.values())).shape
    if image_shape is not None and image_shape[0] * image_shape[1] == features:
        fig = _heat_maps(plt, arrays, image_shape, targets, target_names)
    else:
        fig = _bars(plt, arrays, features, feature_names)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _heat_maps(
    plt: Any,
    arrays: Mapping[str, npt.NDArray[np.float64]],
    shape: tuple[int, int],
    targets: int,
    target_names: Sequence[str] | None,
) -> Any:
    rows = len(arrays)
    fig, axes = plt.subplots(
        rows, targets, figsize=(1.3 * targets + 1.0, 1.5 * rows + 0.4), squeeze=False
    )
    for r, (name, rows_of) in enumerate(arrays.items()):
        scale = float(np.max(np.abs(rows_of))) or 1.0
        for k in range(targets):
            ax = axes[r][k]
            ax.imshow(rows_of[k].reshape(shape), cmap="RdBu_r", vmin=-scale, vmax=scale)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(target_names[k] if target_names else str(k), fontsize=9)
            if k == 0:
                ax.set_ylabel(name, fontsize=8)
    return fig


def _bars(
    plt: Any,
    arrays: Mapping[str, npt.NDArray[np.float64]],
    features: int,
    feature_names: Sequence[str] | None,
) -> Any:
    first = importance(next(iter(arrays.values())))
    shown = np.argsort(-first)[: min(TOP_FEATURES, features)]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(shown) + 2.0), 3.2))
    width = 0.8 / len(arrays)
    for i, (name, rows_of) in enumerate(arrays.items()):
        values = importance(rows_of)
        scale = float(np.max(values)) or 1.0
        ax.bar(np.arange(len(shown)) + i * width, values[shown] / scale, width, label=name)
    labels = [feature_names[j] if feature_names else str(j) for j in shown]
    ax.set_xticks(np.arange(len(shown)) + 0.4 - width / 2)
    ax.set_xticklabels(labels, rotation=90, fontsize=8)
    ax.set_ylabel("importance (scaled to 1)")
    ax.legend(fontsize=8)
    return fig
