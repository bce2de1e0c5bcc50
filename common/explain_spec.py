"""What a federation's private explanation round does: the plan's explanation settings.

:class:`ExplanationSpec` is fixed in the federation's plan, like everything a client
does: the attribution method, the explanation budget ``epsilon``, the clipping norm
``clip`` (``C_e``) of each example's attribution vector, and the vector's shape (the
model outputs attributed, ``targets``, times the attribution values per output,
``features``). Each sampled client sums its examples' clipped attribution vectors, adds
Gaussian noise of std ``sigma_e * C_e`` (``sigma_e`` calibrated so that the release costs
``epsilon`` at the client's delta) and sends the sum through the update codec; the
server adds the ciphertexts, and a few clients open the sum (see
``docs/explain.md``).

The round's messages are Flower ``train`` actions: :data:`EXPLAIN` (contribute) and
:data:`EXPLAIN_OPEN` (decrypt the sum and return the plaintext release), each carrying
the signed round config of the plan's last round plus the fields of
:meth:`ExplanationSpec.record`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

#: The attribution methods (Captum): gradient-based and perturbation-based.
METHODS: tuple[str, ...] = (
    "integrated_gradients",
    "saliency",
    "gradient_shap",
    "kernel_shap",
    "lime",
)
#: The default method of a federated explanation: the plain gradient of each output,
#: the most stable across examples, so the noisy sum keeps its direction best (see
#: ``docs/explain.md``); local explanations default to Integrated Gradients.
DEFAULT_FEDERATED_METHOD = "saliency"
DEFAULT_LOCAL_METHOD = "integrated_gradients"
#: Fields of a tag that binds an explanation sum to the clients' key (see
#: :mod:`sepals.client.explain_round`); they follow the attribution values in a payload.
TAG_FIELDS = 12
#: Longest attribution vector a round may carry.
MAX_LENGTH = 1 << 20

EXPLAIN = "train.explain"
EXPLAIN_OPEN = "train.explain_open"
#: The reply record of an opening client: the plaintext release (float64).
KEY_RELEASE = "release"
_PREFIX = "explain-"


@dataclass(frozen=True)
class ExplanationSpec:
    """A federation's private explanation round, as its plan fixes it.

    Attributes:
        epsilon: What one explanation release costs each client (its ``sigma_e`` is
            calibrated for it at the client's delta, with the client's accountant). It
            is composed with the client's training in its ledger and counted against
            the same total budget: training is calibrated to leave room for it.
        clip: ``C_e``, the L2 norm each example's attribution vector (all targets
            together) is clipped to; the noise std is ``sigma_e * clip``.
        method: One of :data:`METHODS`.
        targets: Model outputs attributed for every example (the classes of a
            classifier; 1 for a single output). ``0``: sized from the model when a
            simulation starts (a plan needs it set).
        features: Attribution values per target (input values, or tokens for token
            inputs). ``0``: sized from the data when a simulation starts.
        max_examples: Most examples a client attributes (a random subset of them,
            drawn from the CSPRNG, when it holds more).
        steps: Integration steps (Integrated Gradients), samples (GradientSHAP) or
            perturbations (KernelSHAP, LIME) per example and target.
        releases: How many explanation releases the plan allows (each costs
            ``epsilon``).

    """

    epsilon: float = 1.0
    clip: float = 1.0
    method: str = DEFAULT_FEDERATED_METHOD
    targets: int = 0
    features: int = 0
    max_examples: int = 1000
    steps: int = 32
    releases: int = 1

    def __post_init__(self) -> None:
        for name in ("epsilon", "clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"explanation {name} must be a positive number, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"explanation {name} must be a positive number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.method not in METHODS:
            raise ValueError(
                f"explanation method must be one of {', '.join(METHODS)}, got {self.method!r}"
            )
        for name, low in (
            ("targets", 0),
            ("features", 0),
            ("max_examples", 1),
            ("steps", 1),
            ("releases", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"explanation {name} must be an integer >= {low}, got {value!r}")
        if self.targets * self.features > MAX_LENGTH:
            raise ValueError(
                f"explanation of {self.targets} x {self.features} values exceeds {MAX_LENGTH}"
            )

    @property
    def sized(self) -> bool:
        """Whether the vector's shape is set (a plan's spec must be)."""
        return self.targets > 0 and self.features > 0

    @property
    def length(self) -> int:
        """Attribution values of one release: ``targets * features``."""
        return self.targets * self.features

    @property
    def payload_length(self) -> int:
        """Values of one encoded contribution: the attributions, then the tag."""
        return self.length + TAG_FIELDS

    def record(self, release: int) -> dict[str, Any]:
        """The fields an explanation message adds to the signed round config."""
        values = {f"{_PREFIX}{k.replace('_', '-')}": v for k, v in asdict(self).items()}
        return {f"{_PREFIX}release": release, **values}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_value(cls, raw: object) -> ExplanationSpec | None:
        """A spec from itself, a dict of its fields (a plan, ``server.toml``), or ``None``.

        Raises:
            ValueError: an unknown key or a bad value (the message names it).

        """
        if raw is None or isinstance(raw, ExplanationSpec):
            return raw
        if not isinstance(raw, Mapping):
            raise ValueError(f"explanation must be a table of settings, got {raw!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise ValueError(f"explanation has unknown key(s): {', '.join(unknown)}")
        return cls(**dict(raw))


def split_record(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A config's explanation fields and the rest (the plain round config)."""
    mine = {k: v for k, v in values.items() if str(k).startswith(_PREFIX)}
    rest = {k: v for k, v in values.items() if not str(k).startswith(_PREFIX)}
    return mine, rest


def explanation_option(value: Any) -> ExplanationSpec | None:
    """A spec from ``simulate(explain=...)``: ``None``, ``True``, a method, a dict or a spec.

    Raises:
        ValueError: anything else, or a bad setting.

    """
    if value is None or value is False:
        return None
    if value is True:
        return ExplanationSpec()
    if isinstance(value, str):
        return ExplanationSpec(method=value)
    spec = ExplanationSpec.from_value(value)
    if spec is None:
        raise ValueError(f"explain must be True, a method, a dict or an ExplanationSpec: {value!r}")
    return spec
