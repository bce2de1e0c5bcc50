"""The sepals client, independent of how it is connected.

:class:`SepalsClient` turns a round message's contents into a reply's contents: it
decrypts the global model, checks the privacy budget, trains with DP-SGD, records the
spend in the ledger, and encrypts the weighted update. The Flower ClientApp
(:mod:`sepals.client.app`), the simulation and the edge SDK all drive this one class.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from torch.utils.data import Dataset

from sepals.client.privacy import PrivacyLedger, planned_participation
from sepals.client.training import (
    TrainSettings,
    dp_schedule,
    evaluate_model,
    make_dp_compatible,
    train_round,
)
from sepals.common.codec import UpdateCodec, make_client_codec
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.errors import MalformedPayloadError
from sepals.common.models import ModelFactory
from sepals.common.protocol import RoundConfig, decode_global_model


@dataclass(frozen=True)
class ClientRuntime:
    """Everything one client brings: identity, model, data, budget and keys.

    Attributes:
        client_id: A stable name for reports and ledgers (not a secret).
        model_factory: Builds a fresh, untrained model; BatchNorm is fixed automatically.
        train_data: Local training data (never leaves the process).
        test_data: Local evaluation data, or ``None`` to decline federated evaluation.
        privacy: The client's own privacy budget.
        encryption: Encryption settings; must match the federation's.
        secret_context: Serialized TenSEAL secret context (``None`` when encryption is off).
        seed: Seed of batch order (and, if ``deterministic_noise``, of the DP noise).
        deterministic_noise: Derive the DP noise seed from ``seed`` (reproducible
            simulations only); otherwise noise is seeded from ``os.urandom``.
        ledger_path: The persistent privacy ledger file (deployments). Each round's
            spend is written there atomically before the update leaves the client, and
            the file is authoritative across restarts. ``None`` keeps the ledger only in
            Flower's ``Context.state`` (simulations).

    """

    client_id: str
    model_factory: ModelFactory
    train_data: Dataset  # type: ignore[type-arg]
    test_data: Dataset | None  # type: ignore[type-arg]
    privacy: PrivacyConfig
    encryption: EncryptionConfig
    secret_context: bytes | None = field(default=None, repr=False)
    seed: int = 0
    deterministic_noise: bool = False
    ledger_path: Path | None = None


@dataclass(frozen=True)
class TrainReply:
    """The contents of a train reply."""

    payload: bytes
    num_examples: int
    metrics: dict[str, float | int]
    ledger: PrivacyLedger


def _derive_seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SepalsClient:
    """One client's side of the protocol."""

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime
        self.factory: ModelFactory = make_dp_compatible(runtime.model_factory)
        self.codec: UpdateCodec = make_client_codec(runtime.encryption, runtime.secret_context)

    def _check_round(self, cfg: RoundConfig) -> None:
        if cfg.codec != self.codec.name:
            raise MalformedPayloadError(
                f"server uses codec {cfg.codec!r}, this client is set up for {self.codec.name!r}"
            )
        if cfg.key_fingerprint != self.codec.fingerprint_hex:
            raise MalformedPayloadError(
                f"server expects HE key {cfg.key_fingerprint}, this client holds "
                f"{self.codec.fingerprint_hex}: wrong key bundle"
            )

    def global_weights(
        self, cfg: RoundConfig, global_model: tuple[bytes, float] | None
    ) -> npt.NDArray[np.float64]:
        """Decrypt the global model, or build the shared seeded round-0 model."""
        weights = decode_global_model(self.codec, self.factory, global_model, cfg.model_seed)
        if weights.shape != (cfg.vector_length,):
            raise MalformedPayloadError(
                f"global model has {weights.size} values, the server announced "
                f"{cfg.vector_length}; is the client's model the federation's model?"
            )
        return weights

    def train(
        self, cfg: RoundConfig, global_model: tuple[bytes, float] | None, ledger: PrivacyLedger
    ) -> TrainReply:
        """Run one round: budget check, DP-SGD, ledger update, weighted encrypted update.

        Raises:
            BudgetExhaustedError: the round would exceed the budget (nothing is trained).
            MalformedPayloadError: wrong key, codec or model size.

        """
        self._check_round(cfg)
        rt = self.runtime
        settings = TrainSettings(
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            momentum=cfg.momentum,
            data_seed=_derive_seed(rt.seed, rt.client_id, cfg.server_round, "data"),
            noise_seed=(
                _derive_seed(rt.seed, rt.client_id, cfg.server_round, "noise")
                if rt.deterministic_noise
                else None
            ),
        )
        n = len(rt.train_data)  # type: ignore[arg-type]
        sample_rate, steps = dp_schedule(n, settings)
        planned = planned_participation(cfg.rounds, cfg.fraction_train)
        ledger = ledger.calibrated(rt.privacy, sample_rate, steps, planned)
        ledger.check_budget(steps)
        t0 = time.perf_counter()
        weights = self.global_weights(cfg, global_model)
        t_decrypt = time.perf_counter() - t0
        outcome = train_round(
            self.factory, weights, rt.train_data, settings, rt.privacy, ledger, cfg.server_round
        )
        t1 = time.perf_counter()
        rounding = (
            np.random.default_rng(_derive_seed(rt.seed, rt.client_id, cfg.server_round, "rounding"))
            if rt.deterministic_noise
            else None  # stochastic rounding seeded from OS entropy
        )
        payload, quant_error = self.codec.encode_update(
            outcome.weights * float(outcome.num_examples), rounding
        )
        t_encrypt = time.perf_counter() - t1
        metrics: dict[str, float | int] = {
            "num-examples": outcome.num_examples,
            "steps": outcome.steps,
            "total-steps": outcome.ledger.steps,
            "rounds-participated": len(outcome.ledger.rounds),
            "train-seconds": outcome.seconds,
            "decrypt-seconds": t_decrypt,
            "encrypt-seconds": t_encrypt,
        }
        if quant_error is not None:
            # Largest rounding error of the encoded (weighted) update: at most one
            # quantization step, so it says nothing about the update's values.
            metrics["quant-error"] = quant_error
        if outcome.ledger.epsilon is not None:
            metrics["epsilon"] = outcome.ledger.epsilon
            metrics["delta"] = outcome.ledger.delta
            metrics["noise-multiplier"] = float(outcome.ledger.noise_multiplier or 0.0)
            metrics["sample-rate"] = float(outcome.ledger.sample_rate or 0.0)
        return TrainReply(payload, outcome.num_examples, metrics, outcome.ledger)

    def evaluate(
        self, cfg: RoundConfig, global_model: tuple[bytes, float] | None
    ) -> dict[str, float | int]:
        """Evaluate the decrypted global model on the local test data."""
        self._check_round(cfg)
        if self.runtime.test_data is None:
            raise ValueError("this client has no test data")
        weights = self.global_weights(cfg, global_model)
        loss, acc, count = evaluate_model(self.factory, weights, self.runtime.test_data)
        return {"num-examples": count, "loss": loss, "accuracy": acc}
