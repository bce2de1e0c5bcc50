"""The sepals client, independent of how it is connected.

:class:`SepalsClient` turns a round message's contents into a reply's contents: it
decrypts the global model, checks the privacy budget, trains with DP-SGD, records the
spend in the ledger, and encrypts the weighted update. The Flower ClientApp
(:mod:`sepals.client.app`), the simulation and the edge SDK all drive this one class.

Before any of that, :meth:`SepalsClient.admit` checks the round against the client's
own :class:`~sepals.common.plan.FederationPlan`: the operator's signature, the
federation id, every config field, and that the round is neither one this client has
already trained in nor past the plan's last. The noise multiplier is calibrated from the
plan alone; nothing a message says can change it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import DEBUG, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from torch.utils.data import Dataset

from sepals.client.epsilon import release_reserve
from sepals.client.privacy import PrivacyLedger, planned_participation
from sepals.client.secret_random import DpRandomness
from sepals.client.training import (
    LossFn,
    MetricFn,
    TrainOutcome,
    TrainSettings,
    dp_schedule,
    evaluate_model,
    model_builder,
    train_round,
)
from sepals.common.accounting import delta_problem
from sepals.common.bfv import BfvCodec
from sepals.common.codec import UpdateCodec
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.errors import DeltaTooLargeError, MalformedPayloadError
from sepals.common.explain import load_captum
from sepals.common.files import checkpoint_sha256
from sepals.common.finetune import TrainableSpec
from sepals.common.log import log
from sepals.common.models import ModelFactory, num_parameters
from sepals.common.plan import FederationPlan, PlanViolationError
from sepals.common.protocol import (
    RoundConfig,
    decode_global_model,
    encode_contribution,
    initial_weights,
)
from sepals.common.records import GlobalModel
from sepals.common.round_signature import global_model_digest, verify_round_signature
from sepals.common.scheme import make_client_codec


@dataclass(frozen=True)
class ClientRuntime:
    """Everything one client brings: identity, model, data, budget and keys.

    Attributes:
        client_id: A stable name for reports and ledgers (not a secret).
        model_factory: Builds a fresh, untrained model; BatchNorm is fixed automatically.
        train_data: Local training data (never leaves the process). A privacy audit's
            simulated clients hold :class:`sepals.client.canaries.CanaryData`.
        test_data: Local evaluation data, or ``None`` to decline federated evaluation.
        privacy: The client's own privacy budget.
        encryption: Encryption settings; must match the federation's.
        plan: The federation's plan, from the client's own bundle (the simulation
            harness hands every client the plan it made). It fixes the noise
            calibration and decides which rounds this client serves.
        secret_context: Serialized TenSEAL secret context (``None`` when encryption is off).
        reproducible_seed: TESTS ONLY. ``None`` (the default, and the only private
            choice) draws the DP sampling, noise and rounding under fresh keys from the
            kernel's CSPRNG; an integer derives them from itself, the client id and the
            round, so anyone who knows it can replay them and no epsilon holds.
        ledger_path: The persistent privacy ledger file (deployments). Each round's
            spend is written there atomically before the update leaves the client, and
            the file is authoritative across restarts. ``None`` keeps the ledger only in
            Flower's ``Context.state`` (simulations).
        loss_fn: The training and evaluation loss, the batch mean as a 0-dim tensor
            (``None``: cross-entropy).
        metric: The evaluation metric over all outputs and targets (``None``: accuracy).
        metric_name: The metric's name in reports.
        device: Where training runs: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
            Encoding and decoding stay on the CPU.
        pretrained: The client's local copy of the federation's pretrained checkpoint
            (a file or directory), or ``None`` for a seeded random start. Its SHA-256
            must be the plan's ``checkpoint_sha256``.
        trainable: What the federation trains (:data:`sepals.common.finetune.TrainableSpec`);
            only these parameters are trained, noised, encrypted and sent.

    """

    client_id: str
    model_factory: ModelFactory
    train_data: Dataset  # type: ignore[type-arg]
    test_data: Dataset | None  # type: ignore[type-arg]
    privacy: PrivacyConfig
    encryption: EncryptionConfig
    plan: FederationPlan
    secret_context: bytes | None = field(default=None, repr=False)
    reproducible_seed: int | None = None
    ledger_path: Path | None = None
    loss_fn: LossFn | None = None
    metric: MetricFn | None = None
    metric_name: str = "accuracy"
    device: str = "auto"
    pretrained: Path | None = None
    trainable: TrainableSpec = None


@dataclass(frozen=True)
class TrainReply:
    """The contents of a train reply."""

    payload: bytes
    num_examples: int
    metrics: dict[str, int | float | list[int] | list[float]]
    ledger: PrivacyLedger


@functools.lru_cache(maxsize=4)
def _client_codec(config: EncryptionConfig, secret_context: bytes | None) -> UpdateCodec:
    """The client codec for a key bundle, loaded once per process.

    Loading a BFV key builds a SEAL context (tens of milliseconds). A simulation worker
    plays many clients with the same bundle; a codec keeps no per-client state (its
    randomness is drawn per call), so they share one.
    """
    return make_client_codec(config, secret_context)


class SepalsClient:
    """One client's side of the protocol.

    Raises:
        ValueError: the plan does not match the client's codec, HE key or model.
        PlanViolationError: the client's pretrained checkpoint is not the plan's.

    """

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime
        self.plan = runtime.plan
        check_checkpoint(self.plan, runtime.pretrained)
        self.factory: ModelFactory = model_builder(
            runtime.model_factory, runtime.pretrained, runtime.trainable
        )
        self.codec: UpdateCodec = _client_codec(runtime.encryption, runtime.secret_context)
        if self.plan.codec != self.codec.name:
            raise ValueError(
                f"the federation's plan uses codec {self.plan.codec!r}, this client's "
                f"encryption settings give {self.codec.name!r}"
            )
        if self.plan.key_fingerprint != self.codec.fingerprint_hex:
            raise ValueError(
                f"the federation's plan names HE key {self.plan.key_fingerprint}, this "
                f"client holds {self.codec.fingerprint_hex}: wrong key bundle"
            )
        if self.plan.ring_degree != self.codec.poly_modulus_degree:
            raise ValueError(
                f"the federation's plan uses HE ring N={self.plan.ring_degree}, this "
                f"client's keys N={self.codec.poly_modulus_degree}: wrong key bundle"
            )
        if self.plan.explanation is not None:
            load_captum()  # the explanation round's library loads with the client, once
        size = num_parameters(self.factory())
        if size != self.plan.vector_length:
            raise ValueError(
                f"this client's model has {size} parameters, the federation's plan says "
                f"{self.plan.vector_length}; every client must build the federation's model "
                "and train the same part of it (only trainable parameters count)"
            )

    def admit(
        self,
        message_type: str,
        config: Mapping[str, Any] | None,
        global_model: GlobalModel | tuple[bytes, float] | None,
        ledger: PrivacyLedger | None = None,
    ) -> RoundConfig:
        """Check a round message against the plan; nothing else happens before this.

        Args:
            message_type: The message's type (``train`` or ``evaluate``), as signed.
            config: The message's ``config`` record (``None`` if it has none).
            global_model: The parsed ``global`` record it carries.
            ledger: For training: the client's ledger, whose rounds it may not repeat.

        Returns:
            The plan's config of that round (equal to the message's).

        Raises:
            PlanViolationError: the round is not the operator's, departs from the plan,
                repeats a round already trained in, or lies past the plan's last round.

        """
        if config is None:
            raise PlanViolationError("malformed round config", "no config record")
        values = dict(config.items())
        verify_round_signature(self.plan, message_type, values, global_model_digest(global_model))
        cfg = RoundConfig.admitted(self.plan, values)
        if ledger is not None and cfg.server_round in ledger.rounds:
            raise PlanViolationError("round already trained", f"round {cfg.server_round}")
        return cfg

    @functools.cached_property
    def anchor(self) -> npt.NDArray[np.float64]:
        """The shared round-0 model, built once: every update is its change from it."""
        return initial_weights(self.factory, self.plan.model_seed)

    def global_weights(
        self, cfg: RoundConfig, global_model: GlobalModel | tuple[bytes, float] | None
    ) -> npt.NDArray[np.float64]:
        """Decrypt the global model, or build the shared seeded round-0 model."""
        weights = decode_global_model(
            self.codec, self.factory, global_model, cfg.model_seed, self.anchor
        )
        if weights.shape != (cfg.vector_length,):
            raise MalformedPayloadError(
                f"global model has {weights.size} values, the plan says {cfg.vector_length}"
            )
        return weights

    def train(
        self,
        cfg: RoundConfig,
        global_model: GlobalModel | tuple[bytes, float] | None,
        ledger: PrivacyLedger,
        slot_mask: npt.NDArray[np.uint64] | None = None,
    ) -> TrainReply:
        """Run one admitted round: budget check, DP-SGD, ledger update, encrypted update.

        ``cfg`` comes from :meth:`admit`. ``slot_mask`` (BFV only) is the round's total
        mask (:mod:`sepals.client.masking`), added to the update's slots before encryption.
        Sigma is calibrated (once, on first use) from
        the plan's rounds, sampling fraction, batch size and epochs, never from a message.

        Raises:
            BudgetExhaustedError: the round would exceed the budget (nothing is trained).
            MalformedPayloadError: the global model does not decrypt to the plan's size.

        """
        rt = self.runtime
        settings, ledger, steps = self._scheduled(cfg, ledger)
        ledger.check_budget(steps)
        weights = self.global_weights(cfg, global_model)
        outcome = train_round(
            self.factory,
            weights,
            rt.train_data,
            settings,
            rt.privacy,
            ledger,
            cfg.server_round,
            loss_fn=rt.loss_fn,
            device=rt.device,
        )
        rounding = settings.randomness.generator("rounding")
        change, clamped = encode_contribution(
            outcome.weights,
            self.anchor,
            outcome.num_examples,
            self.plan.weight_cap,
            self.codec.value_bound,
        )
        if clamped:
            log(
                WARNING,
                "client %s round %s: %s values of the update's change from the initial "
                "model exceeded update_bound=%g and were clamped to it (raise update_bound)",
                rt.client_id,
                cfg.server_round,
                clamped,
                self.codec.value_bound,
            )
        if slot_mask is None:
            payload, quant_error = self.codec.encode_update(change, rounding)
        elif isinstance(self.codec, BfvCodec):
            payload, quant_error = self.codec.encode_update(change, rounding, slot_mask=slot_mask)
        else:
            raise ValueError(f"masking needs the BFV codec, this client has {self.codec.name}")
        log(
            DEBUG,
            "client %s round %s: %s steps in %.1f s",
            rt.client_id,
            cfg.server_round,
            outcome.steps,
            outcome.seconds,
        )
        metrics = train_metrics(outcome, quant_error)
        metrics["clamped-values"] = clamped
        return TrainReply(payload, outcome.num_examples, metrics, outcome.ledger)

    def check_budget(self, cfg: RoundConfig, ledger: PrivacyLedger) -> None:
        """Raise :class:`BudgetExhaustedError` if training ``cfg``'s round would exceed it.

        What :meth:`train` checks first, without training: a client declines a round's
        masking setup when it could not train in it.
        """
        _, calibrated, steps = self._scheduled(cfg, ledger)
        calibrated.check_budget(steps)

    def _scheduled(
        self, cfg: RoundConfig, ledger: PrivacyLedger
    ) -> tuple[TrainSettings, PrivacyLedger, int]:
        """The round's training settings, the calibrated ledger and its DP steps."""
        rt, plan = self.runtime, self.plan
        settings = TrainSettings(
            epochs=plan.local_epochs,
            batch_size=plan.batch_size,
            learning_rate=plan.learning_rate_at(cfg.server_round),
            momentum=plan.momentum,
            randomness=DpRandomness(rt.reproducible_seed).child(rt.client_id, cfg.server_round),
        )
        n = len(rt.train_data)  # type: ignore[arg-type]
        problem = delta_problem(rt.privacy.delta, n) if rt.privacy.enabled else None
        if problem is not None:
            raise DeltaTooLargeError(problem)
        sample_rate, steps = dp_schedule(n, settings)
        planned = planned_participation(plan.rounds, plan.fraction_train)
        # Training leaves room in the budget for the plan's explanation releases.
        reserve = release_reserve(plan.explanation, rt.privacy)
        calibrated = ledger.calibrated(rt.privacy, sample_rate, steps, planned, reserve)
        return settings, calibrated, steps

    def evaluate(
        self, cfg: RoundConfig, global_model: GlobalModel | tuple[bytes, float] | None
    ) -> dict[str, int | float | list[int] | list[float]]:
        """Evaluate the decrypted global model of an admitted round on the local test data.

        The reply carries ``loss`` (the app's loss) and, with the default metric,
        ``accuracy``; an app's own metric goes as ``metric`` instead.
        """
        rt = self.runtime
        if rt.test_data is None:
            raise ValueError("this client has no test data")
        weights = self.global_weights(cfg, global_model)
        loss, value, count = evaluate_model(
            self.factory,
            weights,
            rt.test_data,
            loss_fn=rt.loss_fn,
            metric=rt.metric,
            device=rt.device,
        )
        key = "accuracy" if rt.metric is None else "metric"
        return {"num-examples": count, "loss": loss, key: value}


def check_checkpoint(plan: FederationPlan, pretrained: Path | None) -> None:
    """Refuse to serve ``plan`` unless ``pretrained`` is the checkpoint it names.

    Raises:
        PlanViolationError: the plan names a checkpoint and the client has none or
            another one, or the client has one the plan does not name.

    """
    want = plan.checkpoint_sha256
    if pretrained is None:
        if want:
            raise PlanViolationError(
                "pretrained checkpoint missing",
                f"the federation starts from checkpoint sha256 {want[:16]}..., this client "
                "was given none",
            )
        return
    have = checkpoint_sha256(pretrained)
    if not want:
        raise PlanViolationError(
            "pretrained checkpoint not in plan",
            f"this client starts from {Path(pretrained).name} (sha256 {have[:16]}...), the "
            "federation's plan names no checkpoint (provision with --pretrained)",
        )
    if have != want:
        raise PlanViolationError(
            "pretrained checkpoint mismatch",
            f"the local copy {Path(pretrained).name} has sha256 {have[:16]}..., the "
            f"federation's plan names {want[:16]}...: get the federation's checkpoint",
        )


def train_metrics(
    outcome: TrainOutcome, quant_error: float | None
) -> dict[str, int | float | list[int] | list[float]]:
    """The plaintext metrics of a train reply: what the server's reports need, no more.

    * ``num-examples``: sets the FedAvg weight (the dataset size is public under the
      zero-out relation the budget is stated for).
    * ``total-steps``, ``rounds-participated``, and with DP ``epsilon``, ``delta``,
      ``noise-multiplier``, ``sample-rate``: the privacy spend, so that anyone can
      recompute epsilon from sigma, q and the steps; ``epsilon-replace-one``: the
      same spend for replace-one neighbours, which also covers the example count.
    * ``quant-error``: the largest rounding error of the encoded update, at most one
      quantization step, so it says nothing about the update's values.
    * ``clamped-values`` (added by :meth:`SepalsClient.train`): how many values of the
      weighted change reached the codec's bound and were clamped; post-processing of
      the DP-SGD output.

    Per-round steps and timings stay on the client (its debug log).
    """
    ledger = outcome.ledger
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": outcome.num_examples,
        "total-steps": ledger.steps,
        "rounds-participated": len(ledger.rounds),
    }
    if quant_error is not None:
        metrics["quant-error"] = quant_error
    if ledger.epsilon is not None:
        metrics["epsilon"] = ledger.epsilon
        if ledger.replace_one_epsilon is not None and math.isfinite(ledger.replace_one_epsilon):
            metrics["epsilon-replace-one"] = ledger.replace_one_epsilon
        metrics["delta"] = ledger.delta
        metrics["noise-multiplier"] = float(ledger.noise_multiplier or 0.0)
        metrics["sample-rate"] = float(ledger.sample_rate or 0.0)
    return metrics
