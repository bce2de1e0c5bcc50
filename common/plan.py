"""The federation's privacy plan, and the operator's signature on every round.

``sepals provision`` fixes a :class:`FederationPlan` once: rounds, sampling fraction,
local training, codec, HE key, model size, a random federation id and the operator's
Ed25519 public key. Every client bundle holds a copy. A client calibrates its noise
from its own plan, never from a message, and serves only rounds that

* carry its federation id,
* are signed by the operator's key (the server bundle holds the private key), and
* agree with the plan in every field (see
  :meth:`sepals.common.protocol.RoundConfig.plan_mismatch`).

The signature covers the message type, every config field (the federation id
included) and a SHA-256 digest of the global model the message carries, so a signed
config cannot be replayed with another model, and a run the operator did not start
cannot produce one. :class:`OperatorSigner` is the server's side (it plugs into
``EncryptedFedAvg(round_signer=...)``); :func:`verify_round_signature` the client's.

The plan file is JSON (``plan.json`` in the server bundle, ``plan`` in every
``bundle.json``)::

    {"format": "sepals-plan/1", "federation_id": "<32 hex>", "rounds": 30, ...}
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PublicKey,
)

from sepals.common.config import MAX_COEFF_MODULUS_BITS
from sepals.common.errors import SepalsError
from sepals.common.explain_spec import ExplanationSpec
from sepals.common.federation import (
    DEFAULT_WEIGHT_CAP,
    FederationConfig,
    check_noise_shares,
    check_weight_cap,
)
from sepals.common.files import atomic_write

PLAN_FORMAT = "sepals-plan/1"
KEY_FEDERATION_ID = "federation-id"
KEY_SIGNATURE = "signature"
# Federation ids and key fingerprints: 16 bytes as lowercase hex.
HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CODEC = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


class PlanViolationError(SepalsError):
    """A round message that this client's plan does not allow; nothing was trained.

    Attributes:
        reason: A short, fixed reason that may go back to the sender (it never holds a
            value from the message or the plan). The exception's message holds the
            details, for the local log only.

    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --------------------------------------------------------------------------- the plan
def _int(name: str, value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"plan.{name} must be an integer >= {low}, got {value!r}")
    return value


def _float(name: str, value: object, low: float, high: float, *, open_low: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        number = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(number) and (low < number if open_low else low <= number)
        ok = ok and number <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"plan.{name} must be a number in {bracket}{low}, {high}], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _str(name: str, value: object, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"plan.{name} must be {what}, got {value!r}")
    return value


_OPTIONAL_FIELDS = frozenset(
    {
        "mask_neighbours",
        "mask_threshold",
        "noise_shares",
        "weight_cap",
        "checkpoint_sha256",
        "poly_modulus_degree",
        "explanation",
    }
)
PLAIN_CODEC = "plain-fp32"
#: The ring every HE plan had before the plan recorded it: a plan without
#: ``poly_modulus_degree`` means this ring (or none, for the plaintext codec).
LEGACY_RING = 8192


@dataclass(frozen=True)
class FederationPlan:
    """What a federation will do, fixed at provisioning; every client holds a copy.

    Attributes:
        federation_id: Random 128-bit id (32 hex digits) of this federation.
        rounds: Rounds the federation runs; no round past the last is served.
        fraction_train: Sampling fraction; with ``rounds`` it sets each client's
            planned participation, and so its noise multiplier.
        local_epochs: Local epochs per round.
        batch_size: Expected batch size (sets the Poisson sample rate).
        learning_rate: Learning rate of round 1.
        lr_schedule: ``cosine`` or ``constant`` (see :meth:`learning_rate_at`).
        momentum: SGD momentum.
        model_seed: Seed of the shared round-0 model.
        codec: Name of the update codec (``bfv-q2``, ``ckks``, ``plain-fp32``).
        key_fingerprint: Hex fingerprint of the federation's HE key (16 bytes).
        vector_length: Parameter count of the federation's model.
        operator_key: The operator's Ed25519 public key, raw, as 64 hex digits.
        mask_neighbours: Pairwise-masking degree ``k`` (0: no masking). With masking
            on, a client uploads only masked updates, shares its secrets with threshold
            ``mask_threshold`` and nothing a message says can change either.
        mask_threshold: Pairwise-masking Shamir threshold ``T`` (0: no masking).
        noise_shares: ``m`` (see :attr:`FederationConfig.noise_shares`): needs
            masking with ``T >= m``; every client still adds its whole noise.
        weight_cap: Examples at which a client's FedAvg weight saturates (see
            :attr:`FederationConfig.weight_cap`).
        checkpoint_sha256: SHA-256 of the pretrained checkpoint every party starts from
            (:func:`sepals.common.finetune.checkpoint_sha256`), or ``""`` for a seeded
            random start. A client whose local checkpoint differs refuses to train.
        poly_modulus_degree: The HE ring degree N of the federation's keys (BFV sizes it
            to the model: :func:`sepals.common.config.bfv_ring_for`); 0 for the
            plaintext codec. A client whose keys are of another ring refuses to train.
            ``None`` (a plan written before the plan recorded the ring) means the only
            ring sepals made then: :data:`LEGACY_RING` for HE codecs, 0 for plaintext.
        explanation: The private explanation round after training, sized
            (:class:`~sepals.common.explain_spec.ExplanationSpec`), or ``None``: a client
            serves no explanation round its plan does not name, and calibrates its
            training to leave the explanation's epsilon in its budget.

    """

    federation_id: str
    rounds: int
    fraction_train: float
    local_epochs: int
    batch_size: int
    learning_rate: float
    lr_schedule: str
    momentum: float
    model_seed: int
    codec: str
    key_fingerprint: str
    vector_length: int
    operator_key: str
    mask_neighbours: int = 0
    mask_threshold: int = 0
    noise_shares: int = 1
    weight_cap: int = DEFAULT_WEIGHT_CAP
    checkpoint_sha256: str = ""
    poly_modulus_degree: int | None = None
    explanation: ExplanationSpec | None = None

    def __post_init__(self) -> None:
        _str("federation_id", self.federation_id, HEX32, "32 lowercase hex digits")
        _int("rounds", self.rounds, 1)
        # Numbers are stored as floats, so that a plan reads the same however it was made.
        fraction = _float("fraction_train", self.fraction_train, 0.0, 1.0, open_low=True)
        object.__setattr__(self, "fraction_train", fraction)
        _int("local_epochs", self.local_epochs, 1)
        _int("batch_size", self.batch_size, 1)
        rate = _float("learning_rate", self.learning_rate, 0.0, math.inf, open_low=True)
        object.__setattr__(self, "learning_rate", rate)
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(
                f"plan.lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}"
            )
        momentum = _float("momentum", self.momentum, 0.0, 1.0, open_low=False)
        if momentum == 1.0:
            raise ValueError("plan.momentum must be a number in [0, 1), got 1.0")
        object.__setattr__(self, "momentum", momentum)
        _int("model_seed", self.model_seed, 0)
        _str("codec", self.codec, _CODEC, "a codec name such as 'bfv-q2'")
        _str("key_fingerprint", self.key_fingerprint, HEX32, "32 lowercase hex digits")
        _int("vector_length", self.vector_length, 1)
        _str("operator_key", self.operator_key, _HEX64, "64 lowercase hex digits")
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.operator_key))
        except ValueError as exc:
            raise ValueError("plan.operator_key is not an Ed25519 public key") from exc
        _int("mask_neighbours", self.mask_neighbours, 0)
        _int("mask_threshold", self.mask_threshold, 0)
        if (self.mask_neighbours == 0) != (self.mask_threshold == 0) or (
            self.mask_threshold > self.mask_neighbours
        ):
            raise ValueError(
                "plan.mask_threshold must be 0 with masking off, else in [1, mask_neighbours]"
            )
        try:
            check_noise_shares(self.noise_shares, self.mask_threshold)
        except ValueError as exc:
            raise ValueError(f"plan.{exc}") from None
        try:
            check_weight_cap(self.weight_cap)
        except ValueError as exc:
            raise ValueError(f"plan.{exc}") from None
        if self.checkpoint_sha256 != "":
            what = '64 lowercase hex digits or ""'
            _str("checkpoint_sha256", self.checkpoint_sha256, _HEX64, what)
        plain = self.codec == PLAIN_CODEC
        ring = self.poly_modulus_degree
        if ring is None:
            ring = 0 if plain else LEGACY_RING
        rings = sorted(MAX_COEFF_MODULUS_BITS)
        is_int = isinstance(ring, int) and not isinstance(ring, bool)
        if plain and not (is_int and ring == 0):
            raise ValueError(
                f"plan.poly_modulus_degree must be 0 for codec {PLAIN_CODEC!r}, got {ring!r}"
            )
        if not plain and not (is_int and ring in rings):
            raise ValueError(
                f"plan.poly_modulus_degree must be one of {rings} for codec {self.codec!r}, "
                f"got {ring!r}"
            )
        object.__setattr__(self, "poly_modulus_degree", ring)
        try:
            explanation = ExplanationSpec.from_value(self.explanation)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"plan.{exc}") from None
        if explanation is not None and not explanation.sized:
            raise ValueError("plan.explanation must set targets and features (>= 1)")
        if explanation is not None and self.codec == "ckks":
            raise ValueError("plan.explanation needs the bfv or plain codec, not ckks")
        object.__setattr__(self, "explanation", explanation)

    # ------------------------------------------------------------------ build
    @classmethod
    def create(
        cls,
        federation: FederationConfig,
        codec: str,
        key_fingerprint: str,
        vector_length: int,
        operator_key: str,
        federation_id: str | None = None,
        checkpoint_sha256: str = "",
        poly_modulus_degree: int | None = None,
    ) -> FederationPlan:
        """The plan of ``federation``, with a fresh random federation id unless given.

        Args:
            federation: Rounds, sampling, local training and model seed.
            codec: The update codec's name.
            key_fingerprint: Hex fingerprint of the HE key (the codec's).
            vector_length: The model's parameter count.
            operator_key: The operator's public key, as :func:`generate_operator_key`
                returns it.
            federation_id: Only to rebuild a known plan; new federations get a random one.
            checkpoint_sha256: SHA-256 of the pretrained checkpoint (``""``: none).
            poly_modulus_degree: The HE key's ring degree (the codec's
                ``poly_modulus_degree``; 0 for plaintext, ``None``: :data:`LEGACY_RING`).

        """
        return cls(
            federation_id=federation_id or secrets.token_hex(16),
            rounds=federation.rounds,
            fraction_train=federation.fraction_train,
            local_epochs=federation.local_epochs,
            batch_size=federation.batch_size,
            learning_rate=federation.learning_rate,
            lr_schedule=federation.lr_schedule,
            momentum=federation.momentum,
            model_seed=federation.seed,
            codec=codec,
            key_fingerprint=key_fingerprint,
            vector_length=vector_length,
            operator_key=operator_key,
            mask_neighbours=federation.mask_neighbours,
            mask_threshold=federation.mask_threshold,
            noise_shares=federation.noise_shares,
            weight_cap=federation.weight_cap,
            checkpoint_sha256=checkpoint_sha256,
            poly_modulus_degree=poly_modulus_degree,
            explanation=federation.explanation,
        )

    @property
    def ring_degree(self) -> int:
        """The HE ring degree N (0: plaintext); never ``None`` once the plan is built."""
        return self.poly_modulus_degree or 0

    def learning_rate_at(self, server_round: int) -> float:
        """The learning rate of ``server_round`` under the plan's schedule.

        The same formula the server uses (:meth:`FederationConfig.learning_rate_at`).
        """
        schedule = FederationConfig(
            rounds=self.rounds,
            learning_rate=self.learning_rate,
            lr_schedule=self.lr_schedule,  # type: ignore[arg-type]
        )
        return schedule.learning_rate_at(server_round)

    def public_key(self) -> Ed25519PublicKey:
        """The operator's public key."""
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.operator_key))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the format tag."""
        values = asdict(self)
        if values["explanation"] is None:
            del values["explanation"]  # a plan without one reads as before
        return {"format": PLAN_FORMAT, **values}

    def to_json(self) -> str:
        """The plan as JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, raw: object) -> FederationPlan:
        """Parse and check a dict made by :meth:`to_dict`.

        Raises:
            ValueError: the format tag is wrong, a key is missing or unknown, or a value
                has the wrong type or range; the message names the key (``plan.rounds``).

        """
        if not isinstance(raw, Mapping):
            raise ValueError(f"plan must be a JSON object, got {type(raw).__name__}")
        if raw.get("format") != PLAN_FORMAT:
            raise ValueError(f"plan.format must be {PLAN_FORMAT!r}, got {raw.get('format')!r}")
        names = [f.name for f in fields(cls)]
        # Plans written before masking existed lack its fields: masking stays off; those
        # written before the ring was recorded lack it: their HE keys are N = 8192.
        missing = [n for n in names if n not in raw and n not in _OPTIONAL_FIELDS]
        if missing:
            raise ValueError(f"plan lacks {', '.join(f'plan.{n}' for n in missing)}")
        if "poly_modulus_degree" in raw and raw["poly_modulus_degree"] is None:
            # Only an absent key means an old plan; a written plan always names its ring.
            raise ValueError("plan.poly_modulus_degree must be an integer, got None")
        unknown = sorted(set(raw) - set(names) - {"format"})
        if unknown:
            raise ValueError(f"plan has unknown key(s): {', '.join(map(str, unknown))}")
        return cls(**{n: raw[n] for n in names if n in raw})

    @classmethod
    def from_json(cls, text: str) -> FederationPlan:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: not JSON, or not a valid plan.

        """
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"plan is not JSON ({exc.args[0]})") from exc
        return cls.from_dict(raw)

    def save(self, path: Path) -> None:
        """Write the plan to ``path`` (atomically; it is public)."""
        atomic_write(path, self.to_json().encode())

    @classmethod
    def load(cls, path: Path) -> FederationPlan:
        """Read a plan file.

        Raises:
            ValueError: the file cannot be read or is not a valid plan (names the file).

        """
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read plan {path}: {exc.strerror or exc}") from exc
        try:
            return cls.from_json(text)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
