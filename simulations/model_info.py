"""The model entry of a run's report and start line: what trains, from what, changed how.

One build of the federation's model, made before any data is split or any process
starts, so a checkpoint that does not fit the model (or supplies none of its frozen
parameters) is refused at once. The entry names the checkpoint and how much of the
model it supplied, and the layers sepals replaced to make the model trainable with
DP-SGD, with how to rebuild the saved model (:mod:`sepals.common.model_changes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sepals.client.edge_app import EdgeApp
from sepals.common.files import checkpoint_sha256
from sepals.common.finetune import ParameterCounts, describe_trainable
from sepals.common.model_changes import (
    FineTunedFactory,
    dp_replacements,
    rebuild_hint,
)
from sepals.common.models import ModelFactory


def describe_model(edge: EdgeApp, factory: ModelFactory) -> tuple[dict[str, Any], ParameterCounts]:
    """The report's ``config.model`` entry (without the HE ring) and the parameter counts.

    Raises:
        ModelCompatibilityError: the model cannot be trained with DP-SGD, or its
            checkpoint does not fit it or supplies none of its frozen parameters.
        ValueError: the checkpoint does not exist.

    """
    counts = ParameterCounts.of(factory())
    checkpoint = None if edge.pretrained is None else Path(edge.pretrained)
    coverage = factory.coverage if isinstance(factory, FineTunedFactory) else None
    # With a checkpoint an unsupported layer is refused, never replaced.
    replaced = dp_replacements(edge.model_factory) if checkpoint is None else ()
    info = {
        "parameters": counts.to_dict(),
        "trainable": describe_trainable(edge.trainable),
        "pretrained": None if checkpoint is None else str(checkpoint),
        "checkpoint_sha256": "" if checkpoint is None else checkpoint_sha256(checkpoint),
        "checkpoint_supplied": None if coverage is None else coverage.to_dict(),
        "replaced_layers": list(replaced),
        "rebuild": rebuild_hint(replaced),
    }
    return info, counts


def saved_model_note(info: dict[str, Any]) -> dict[str, Any]:
    """What the saved ``model.pt`` says about itself (``state_dict._metadata``)."""
    return {
        "replaced_layers": list(info.get("replaced_layers") or []),
        "rebuild": info.get("rebuild") or "",
        "trainable": info.get("trainable", "all"),
        "pretrained": info.get("pretrained"),
    }
