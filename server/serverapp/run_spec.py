"""The run spec: everything the ServerApp of a deployed federation is told.

``sepals-server`` (the operator's control plane) reads and checks ``server.toml``, then
writes this spec into the state directory and names it in the run config. The ServerApp
process reads the spec and nothing of ``server.toml``: it never sees the TLS key, the
SuperLink's address or the node keys. The spec names the public HE context, the
federation's plan and the operator's round-signing key, which the ServerApp needs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sepals.common.codec import UpdateCodec
from sepals.common.config import EncryptionConfig
from sepals.common.federation import FederationConfig
from sepals.common.files import atomic_write
from sepals.common.plan import FederationPlan
from sepals.common.protocol import plan_conflicts
from sepals.common.round_signature import OperatorSigner
from sepals.common.scheme import make_server_codec

RUN_SPEC_FILE = "serverapp.json"
_FORMAT = "sepals-run-spec/1"
_PATHS = ("state_dir", "public_context", "plan", "operator_key")


@dataclass(frozen=True)
class DeployedRun:
    """What the deployed ServerApp runs, as the control plane checked it.

    Attributes:
        state_dir: Metrics, checkpoints and logs of the federation.
        parameters: Parameter count of the federation's model.
        federation: Rounds, sampling, timeout and local-training settings.
        encryption: HE settings the provisioned keys were made under.
        public_context: The public HE context (``None`` without encryption).
        plan: The federation's plan, which every client holds a copy of.
        operator_key: The operator's Ed25519 key that signs every round.
        min_available_clients: Nodes to wait for before sampling.
        node_wait_timeout: Seconds each round waits for ``min_available_clients`` nodes.
        default_max_examples: Cap on the ``num-examples`` a node may claim.
        max_examples: Per-node caps by client name.

    """

    state_dir: Path
    parameters: int
    federation: FederationConfig
    encryption: EncryptionConfig
    public_context: Path | None
    plan: Path | None
    operator_key: Path | None
    min_available_clients: int
    node_wait_timeout: float
    default_max_examples: int
    max_examples: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )

    def codec(self) -> UpdateCodec:
        """The server codec (public keys only; a secret context is refused).

        Raises:
            SecretKeyExposureError: the public context holds a secret key.
            ValueError: encryption is on and the public context is missing or unreadable.
            PayloadError: the context is not usable key material.

        """
        if not self.encryption.enabled:
            return make_server_codec(self.encryption, None)
        if self.public_context is None:
            raise ValueError("[server] public_context is required when encryption is on")
        try:
            public = self.public_context.read_bytes()
        except OSError as exc:
            raise ValueError(
                f"[server] public_context {self.public_context} cannot be read: "
                f"{exc.strerror or exc}"
            ) from exc
        return make_server_codec(self.encryption, public)

    def signer(self, codec: UpdateCodec) -> OperatorSigner:
        """The signer of this federation's rounds, after checking the plan against us.

        Raises:
            ValueError: the plan or operator key is missing or unusable, or the
                federation settings, the codec, the key or the model size depart from
                the plan (clients would refuse every round); the message names the fields.

        """
        if self.plan is None or self.operator_key is None:
            missing = "plan" if self.plan is None else "operator_key"
            raise ValueError(
                f"[server] {missing} is required: clients serve only rounds that follow "
                "the provisioned plan and carry the operator's signature"
            )
        try:
            plan = FederationPlan.load(self.plan)
        except (OSError, ValueError) as exc:
            raise ValueError(f"[server] plan {self.plan}: {exc}") from exc
        conflicts = plan_conflicts(
            plan, self.federation, codec.name, codec.fingerprint_hex, self.parameters
        )
        if conflicts:
            raise ValueError(
                f"server.toml departs from the federation's plan in: {', '.join(conflicts)}; "
                "clients would refuse every round (re-provision to change the plan)"
            )
        try:
            return OperatorSigner.for_plan(self.operator_key, plan)
        except (OSError, ValueError) as exc:
            raise ValueError(f"[server] operator_key {self.operator_key}: {exc}") from exc

    # ------------------------------------------------------------------ JSON
    def save(self) -> Path:
        """Write the spec to ``state_dir`` (private to the operator); returns its path."""
        raw: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        raw.update(
            format=_FORMAT,
            federation=self.federation.to_dict(),
            encryption=self.encryption.to_dict(),
            max_examples=dict(self.max_examples),
        )
        for key in _PATHS:
            raw[key] = None if raw[key] is None else str(raw[key])
        path = self.state_dir / RUN_SPEC_FILE
        atomic_write(path, json.dumps(raw, indent=2, sort_keys=True).encode(), secret=True)
        return path

    @classmethod
    def load(cls, path: Path) -> DeployedRun:
        """Read a spec that :meth:`save` wrote.

        Raises:
            ValueError: the file cannot be read or is not such a spec (names the file).

        """
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"cannot read the run spec {path}: {exc}") from exc
        if not isinstance(raw, dict) or raw.pop("format", None) != _FORMAT:
            raise ValueError(f"{path} is not a run spec written by sepals-server")
        try:
            paths: dict[str, Any] = {key: raw.pop(key) for key in _PATHS}
            paths = {key: None if value is None else Path(value) for key, value in paths.items()}
            encryption = dict(raw.pop("encryption"))
            encryption["coeff_mod_bit_sizes"] = tuple(encryption["coeff_mod_bit_sizes"])
            encryption.pop("quant_step", None)  # derived from the other fields
            return cls(
                **paths,
                federation=FederationConfig(**raw.pop("federation")),
                encryption=EncryptionConfig(**encryption),
                max_examples=MappingProxyType(dict(raw.pop("max_examples"))),
                **raw,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} is not a valid run spec: {exc}") from exc
