"""Names and helpers of the sepals message protocol on Flower's Message API.

Train message (server to client), a ``RecordDict`` with:

* ``config`` (ConfigRecord): round settings, see :class:`RoundConfig`.
* ``global`` (ArrayRecord): empty in round 1 (every client builds the same seeded
  model); afterwards ``payload`` (the encrypted weighted sum of the last round) and
  ``weight-total`` (the sum of the weights, plaintext metadata).

Train reply: ``update`` (ArrayRecord with ``payload``), ``metrics`` (MetricRecord with
``num-examples`` and privacy figures) and ``client`` (ConfigRecord with ``client-id``).
A client that declines (budget exhausted, bad input, a round its plan does not allow)
replies with a Flower ``Error`` whose code is one of the ``ERR_*`` constants below and
whose reason is a short fixed phrase, never an exception text.

A deployed federation's configs also carry ``federation-id`` and ``signature`` (added by
:class:`sepals.common.plan.OperatorSigner`); each client checks them, and every field
against its own :class:`~sepals.common.plan.FederationPlan`, before it does anything.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from sepals.common.codec import UpdateCodec
from sepals.common.federation import DEFAULT_WEIGHT_CAP, FederationConfig, update_weight
from sepals.common.models import ModelFactory, build_seeded, get_flat
from sepals.common.plan import (
    KEY_FEDERATION_ID,
    KEY_SIGNATURE,
    FederationPlan,
    PlanViolationError,
)
from sepals.common.records import GlobalModel

KEY_CONFIG = "config"
KEY_GLOBAL = "global"
KEY_UPDATE = "update"
KEY_METRICS = "metrics"
KEY_CLIENT = "client"
# Pairwise masking (sepals.common.masking): the ``mask`` ConfigRecord of the masking
# stages' messages and replies, and the stages' message types (Flower actions of
# ``train``). Each stage message also carries the signed round ``config`` and an empty
# ``global`` record.
KEY_MASK = "mask"
KEY_UNMASK = "unmask"  # a setup message's unmask request of the previous round, and its answer
KEY_SETUP_ERROR = "setup-error"  # a setup reply whose setup part failed: code and reason
MASK_REGISTER = "train.mask_register"
MASK_SETUP = "train.mask_setup"
MASK_UNMASK = "train.mask_unmask"
# The check of a round's candidate global model by a few of its clients, before the
# server adopts it: the same signed config, and the candidate as ``global``.
VERIFY_GLOBAL = "train.verify_global"

# The Flower app bundle (FAB) a deployed federation runs; edge nodes serve only this app.
FAB_NAME = "sepals-federation"

ERR_BUDGET_EXHAUSTED = 4101
ERR_BAD_GLOBAL = 4102
ERR_BAD_UPDATE = 4103
# The round departs from the client's plan, is not the operator's (unsigned, badly
# signed, another federation), repeats a round already trained, or lies past the plan.
ERR_PLAN_MISMATCH = 4104
# A masking stage the client refuses (malformed, inconsistent, out of order, or a second
# unmask request of a round); the reason is a fixed phrase.
ERR_MASKING = 4106
# The masking shares some neighbours sealed for this client do not open; the reason
# names them: "bad mask shares from node N[, M...]".
ERR_BAD_SHARES = 4107
BAD_SHARES_REASON = "bad mask shares from node"
ERR_CLIENT_FAILURE = 4199


@dataclass(frozen=True)
class RoundConfig:
    """Plaintext settings the server sends with every train or evaluate message.

    Attributes:
        server_round: The round number, from 1.
        rounds: Total rounds planned (clients calibrate sigma for it).
        fraction_train: Sampling fraction (clients plan their participation with it).
        local_epochs: Local epochs.
        batch_size: Batch size.
        learning_rate: SGD learning rate.
        momentum: SGD momentum.
        model_seed: Seed of the shared round-0 model.
        codec: Name of the update codec (``bfv-q2``, ``ckks`` or ``plain-fp32``).
        key_fingerprint: Hex fingerprint of the HE key the server expects.
        vector_length: Number of model parameters.
        mask_neighbours: Masking graph degree (0: no masking).
        mask_threshold: Masking Shamir threshold (0: no masking).
        noise_shares: ``m`` of the plan (masking threshold at least ``m``).
        weight_cap: Examples at which a client's FedAvg weight saturates.

    """

    server_round: int
    rounds: int
    fraction_train: float
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    model_seed: int
    codec: str
    key_fingerprint: str
    vector_length: int
    mask_neighbours: int = 0
    mask_threshold: int = 0
    noise_shares: int = 1
    weight_cap: int = DEFAULT_WEIGHT_CAP

    @classmethod
    def build(
        cls,
        federation: FederationConfig,
        server_round: int,
        codec: str,
        key_fingerprint: str,
        vector_length: int,
    ) -> RoundConfig:
        """Round settings for ``server_round`` of ``federation``."""
        return cls(
            server_round=server_round,
            rounds=federation.rounds,
            fraction_train=federation.fraction_train,
            local_epochs=federation.local_epochs,
            batch_size=federation.batch_size,
            learning_rate=federation.learning_rate_at(server_round),
            momentum=federation.momentum,
            model_seed=federation.seed,
            codec=codec,
            key_fingerprint=key_fingerprint,
            vector_length=vector_length,
            mask_neighbours=federation.mask_neighbours,
            mask_threshold=federation.mask_threshold,
            noise_shares=federation.noise_shares,
            weight_cap=federation.weight_cap,
        )

    @classmethod
    def for_plan(cls, plan: FederationPlan, server_round: int) -> RoundConfig:
        """The config that ``plan`` allows for ``server_round`` (the only one a client serves)."""
        return cls(
            server_round=server_round,
            rounds=plan.rounds,
            fraction_train=plan.fraction_train,
            local_epochs=plan.local_epochs,
            batch_size=plan.batch_size,
            learning_rate=plan.learning_rate_at(server_round),
            momentum=plan.momentum,
            model_seed=plan.model_seed,
            codec=plan.codec,
            key_fingerprint=plan.key_fingerprint,
            vector_length=plan.vector_length,
            mask_neighbours=plan.mask_neighbours,
            mask_threshold=plan.mask_threshold,
            noise_shares=plan.noise_shares,
            weight_cap=plan.weight_cap,
        )

    @classmethod
    def admitted(cls, plan: FederationPlan, record: Any) -> RoundConfig:
        """Check a received config against ``plan``, field by field; return the plan's config.

        Every field must equal the plan's, with the same type; the learning rate must be
        the plan's schedule at that round to 1e-12 relative. The signature and federation
        id are checked separately (:func:`sepals.common.plan.verify_round_signature`).

        Raises:
            PlanViolationError: with reason ``malformed round config``,
                ``round past the plan`` or ``plan mismatch: <field>``.

        """
        known = {f.name.replace("_", "-") for f in fields(cls)}
        present = set(record.keys())
        missing = sorted(known - present)
        if missing:
            raise PlanViolationError("malformed round config", f"lacks {', '.join(missing)}")
        extra = sorted(present - known - {KEY_FEDERATION_ID, KEY_SIGNATURE})
        if extra:
            raise PlanViolationError(
                "plan mismatch: unexpected field", ", ".join(_show(k) for k in extra)
            )
        server_round = record["server-round"]
        if not isinstance(server_round, int) or isinstance(server_round, bool) or server_round < 1:
            raise PlanViolationError("plan mismatch: server-round", f"got {_show(server_round)}")
        if server_round > plan.rounds:
            raise PlanViolationError(
                "round past the plan", f"round {server_round} of a {plan.rounds}-round plan"
            )
        expected = cls.for_plan(plan, server_round)
        for key, want in expected.to_record_dict().items():
            if not _same_value(record[key], want):
                raise PlanViolationError(
                    f"plan mismatch: {key}", f"got {_show(record[key])}, the plan says {want!r}"
                )
        return expected

    def to_record_dict(self) -> dict[str, Any]:
        """Flat dict with hyphenated keys, ready for a ``ConfigRecord``."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_record_dict(cls, record: Any) -> RoundConfig:
        """Parse a ``ConfigRecord`` produced by :meth:`to_record_dict`.

        Raises:
            ValueError: a field is missing.

        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in record:
                raise ValueError(f"round config lacks {key!r}")
            values[f.name] = record[key]
        return cls(**values)


def _show(value: object) -> str:
    """A received value for the local log: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _same_value(got: object, want: object) -> bool:
    """``got`` equals ``want`` with the same type; floats to 1e-12 relative."""
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, int):
        return isinstance(got, int) and got == want
    if isinstance(want, float):
        return (
            isinstance(got, int | float)
            and math.isfinite(got)
            and math.isclose(float(got), want, rel_tol=1e-12, abs_tol=0.0)
        )
    return type(got) is type(want) and got == want


def plan_conflicts(
    plan: FederationPlan,
    federation: FederationConfig,
    codec: str,
    key_fingerprint: str,
    vector_length: int,
) -> list[str]:
    """Config fields in which a server's settings depart from ``plan`` (empty: none).

    A server whose ``server.toml`` drifted from the provisioned plan would have every
    round refused; call this at start-up to fail fast instead.
    """
    conflicts: list[str] = []
    if federation.rounds != plan.rounds:
        conflicts.append("rounds")
    if federation.explanation != plan.explanation:
        conflicts.append("explanation")
    for server_round in range(1, plan.rounds + 1):
        sent = RoundConfig.build(federation, server_round, codec, key_fingerprint, vector_length)
        allowed = RoundConfig.for_plan(plan, server_round).to_record_dict()
        for key, value in sent.to_record_dict().items():
            if key not in conflicts and not _same_value(value, allowed[key]):
                conflicts.append(key)
    return conflicts


def initial_weights(factory: ModelFactory, model_seed: int) -> npt.NDArray[np.float64]:
    """The shared round-0 model every party builds from ``model_seed``: the anchor.

    Every update is encoded as its change from it (:func:`encode_contribution`).
    """
    return get_flat(build_seeded(factory, model_seed))


def encode_contribution(
    weights: npt.NDArray[np.floating],  # type: ignore[type-arg]
    anchor: npt.NDArray[np.floating],  # type: ignore[type-arg]
    num_examples: int,
    weight_cap: int,
    bound: float | None,
) -> tuple[npt.NDArray[np.float64], int]:
    """What a client adds to the aggregate: its weighted change from the anchor.

    ``update_weight(n, cap) * (weights - anchor)``, each value clamped to ``[-bound,
    bound]`` (``None``: no clamp). The weight is at most 1 and the change from the
    shared round-0 model does not scale with the data, so the values fit the codec at
    any dataset size; FedAvg stays exact for clients with at most ``weight_cap``
    examples. Clamping is post-processing of the DP-SGD output; the count of clamped
    values is returned so that it can be reported.
    """
    change = (np.asarray(weights, dtype=np.float64) - anchor) * update_weight(
        num_examples, weight_cap
    )
    if bound is None:
        return change, 0
    clamped = int(np.count_nonzero(np.abs(change) > bound))
    if clamped:
        np.clip(change, -bound, bound, out=change)
    return change, clamped


def decode_global_model(
    codec: UpdateCodec,
    factory: ModelFactory,
    global_model: GlobalModel | tuple[bytes, float] | None,
    model_seed: int,
    anchor: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64]:
    """Flat weights of the global model, on a party that holds the secret key.

    ``None`` (round 1) is the shared round-0 model every party builds from
    ``model_seed`` (``anchor``, if the caller has it already); otherwise the anchor plus
    the decrypted sum of weighted changes divided by its weight total. The sum is
    checked first (:meth:`UpdateCodec.decode_aggregate`): a party never adopts a model
    that bounded updates could not have made.

    Raises:
        GlobalModelRejectedError: the sum is out of the range its updates allow.

    """
    base = initial_weights(factory, model_seed) if anchor is None else anchor
    if global_model is None:
        return base.copy()
    summands = global_model.summands if isinstance(global_model, GlobalModel) else None
    return base + codec.decode_aggregate(global_model[0], summands) / global_model[1]
