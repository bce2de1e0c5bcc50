"""A simulation's explanation: size the round, compare it with a central one, write files.

``sepals-sim --explain`` and ``simulate(explain=...)`` add the private explanation round
(:mod:`sepals.server.serverapp.strategy.explain`) to the run's plan, sized from the app's
model and data. After the run the evaluator (the simulation's key holder) computes the
central, non-private explanation of the same final model on its held-out test split, for
comparison only; a deployment has no such thing. Into the run folder go
``explanation.json`` (both maps, the mean attribution per target and feature, and what
was released) and ``explanation.png``; ``report.json`` gets an ``explanation`` entry.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader

from sepals.common.explain import attribution_rows, feature_count, output_count
from sepals.common.explain_plot import importance, plot_maps
from sepals.common.explain_spec import ExplanationSpec
from sepals.common.federation import FederationConfig
from sepals.common.models import set_flat
from sepals.server.serverapp.strategy import ExplanationRecord
from sepals.simulations.evaluator import eval_state

#: Most test examples the central explanation attributes.
CENTRAL_EXAMPLES = 2000
#: Flat inputs drawn as images, by bundled dataset.
IMAGE_SHAPES = {"digits": (8, 8)}


def first_input(edge: Any, clients: int) -> torch.Tensor:
    """One training input of the app (a batch of one), to size the explanation."""
    data = edge.train_dataset
    if data is None:
        data = edge.client_data(0, clients)[0]
    batch = next(iter(DataLoader(data, batch_size=1)))
    inputs = batch[0] if isinstance(batch, list | tuple) else batch
    if not isinstance(inputs, torch.Tensor):
        raise ValueError("explanations need examples whose input is one tensor")
    return inputs


def sized_federation(fed: FederationConfig, edge: Any, clients: int) -> FederationConfig:
    """``fed`` with its explanation sized from the app's model outputs and inputs."""
    spec = fed.explanation
    if spec is None or spec.sized:
        return fed
    example = first_input(edge, clients)
    model = edge.build_model_factory()()
    model.eval()
    sized = dataclasses.replace(
        spec,
        targets=spec.targets or output_count(model, example),
        features=spec.features or feature_count(example),
    )
    return dataclasses.replace(fed, explanation=sized)


def central_explanation(spec: ExplanationSpec) -> dict[str, Any] | None:
    """Evaluator (subprocess): the non-private mean attribution of the latest model.

    On up to :data:`CENTRAL_EXAMPLES` of the held-out test split, unclipped and
    un-noised: a reference that only a simulation, which holds the test split and the
    key in one process, can compute. ``None`` without test data.
    """
    state = eval_state()
    test = state.get("test")
    if test is None or "latest" not in state:
        return None
    model = state["factory"]()
    set_flat(model, np.asarray(state["latest"]))
    model.eval()
    count = min(len(test), CENTRAL_EXAMPLES)
    batch = next(iter(DataLoader(test, batch_size=count)))
    inputs = batch[0] if isinstance(batch, list | tuple) else batch
    rows = attribution_rows(model, inputs, spec.targets, method=spec.method, steps=spec.steps)
    mean = rows.mean(axis=0).reshape(spec.targets, spec.features)
    return {"mean": mean.tolist(), "examples": int(inputs.shape[0])}


def cosines(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> list[float | None]:
    """Cosine similarity of two ``(targets, features)`` maps, target by target."""
    out: list[float | None] = []
    for x, y in zip(a, b, strict=True):
        norm = float(np.linalg.norm(x) * np.linalg.norm(y))
        out.append(float(np.dot(x, y) / norm) if norm > 0 else None)
    return out


def write_explanation(
    out: Path,
    record: ExplanationRecord | None,
    central: dict[str, Any] | None,
    *,
    dataset: str | None,
    delta: float | None,
) -> dict[str, Any]:
    """Write ``explanation.json`` and ``explanation.png``; return the report's entry."""
    if record is None:
        return {"released": False, "reason": "the explanation round did not run"}
    spec = record.spec
    entry: dict[str, Any] = {
        "method": spec.method,
        "epsilon": spec.epsilon,
        "delta": delta,
        "clip": spec.clip,
        "targets": spec.targets,
        "features": spec.features,
        "sigma": _one(c.get("explain_sigma") for c in record.clients),
        "clients": len(record.clients),
        "declined": len(record.declined),
        "excluded": len(record.excluded),
        "examples": record.examples,
        "max_epsilon_total": _max(c.get("epsilon") for c in record.clients),
        # Each contributor's total after the release (training plus explanation); the
        # report's other epsilons are those of the training rounds.
        "epsilon_total": {c["client"]: c.get("epsilon") for c in record.clients},
        "openers": {"asked": record.openers_asked, "agreeing": record.openers_agreeing},
        "seconds": record.seconds,
        "upload_bytes": record.upload_bytes,
        "released": record.release is not None,
        "what": (
            "per target and feature, the sum over clients of their examples' attribution "
            "vectors clipped to clip, each client's sum noised N(0, (sigma*clip)^2) on the "
            "client; opened by clients (the server holds no key); examples is the sum of "
            "the example counts the clients send in the clear"
        ),
    }
    if record.release is None:
        entry["reason"] = record.note
        return entry
    private = record.release.reshape(spec.targets, spec.features) / max(record.examples, 1)
    doc: dict[str, Any] = {
        "spec": spec.to_dict(),
        "private": {"mean": private.tolist(), "examples": record.examples},
        "central": central,
    }
    maps = {"private (federated)": private}
    if central is not None:
        reference = np.asarray(central["mean"], dtype=np.float64)
        maps["central (non-private)"] = reference
        per_target = cosines(private, reference)
        valid = [c for c in per_target if c is not None]
        entry["cosine_to_central"] = {
            "per_target": per_target,
            "mean": float(np.mean(valid)) if valid else None,
            "min": min(valid) if valid else None,
            "importance": cosines(importance(private)[None], importance(reference)[None])[0],
        }
    (out / "explanation.json").write_text(json.dumps(doc, indent=1))
    plot_maps(
        out / "explanation.png",
        maps,
        image_shape=IMAGE_SHAPES.get(dataset or ""),
        title=f"{spec.method}, explanation epsilon {spec.epsilon:g} per client",
    )
    entry["files"] = {"data": "explanation.json", "plot": "explanation.png"}
    return entry


def _one(values: Any) -> float | None:
    found = [v for v in values if v is not None]
    return float(found[0]) if found else None


def _max(values: Any) -> float | None:
    found = [float(v) for v in values if v is not None and math.isfinite(v)]
    return max(found) if found else None
