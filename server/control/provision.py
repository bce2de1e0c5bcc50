"""Key provisioning for a deployed federation.

:func:`provision` is run once by an administrator. It creates every key the federation
needs and writes one bundle per party, so that each party is handed only its own::

    OUT/manifest.json                  public: fingerprints of every key, no secret
    OUT/server/                        the server bundle
        bundle.json                    role, address, fingerprints, encryption settings
        ca.pem                         TLS root certificate
        server.pem, server.key (0600)  TLS certificate (SAN = the server host) and key
        he-public.ctx                  public HE context: can add, cannot decrypt
        nodes/<name>.pub               every node's authentication public key
        plan.json                      the federation's plan (also in bundle.json)
        operator.key (0600)            the operator's Ed25519 key: signs every round
        server.toml                    the configuration for ``sepals-server``
    OUT/clients/<name>/                one bundle per client
        bundle.json                    ... and the federation's plan (``plan``)
        ca.pem                         to verify the server
        node.key (0600), node.pub      the node's authentication key pair
        he-secret.ctx (0600)           the shared HE secret context

The provisioner keeps no copy of any secret: the CA private key is discarded after
signing the server certificate unless ``keep_ca_key`` is set (then it is written to
``OUT/ca-private/ca.key``, mode 0600, and belongs offline).

Node authentication keys are ECDSA P-384 in OpenSSH format, as Flower's SuperLink and
SuperNode expect. TLS keys are ECDSA P-256.

The plan (:class:`~sepals.common.plan.FederationPlan`) fixes what the federation does:
rounds, sampling fraction, local training, codec, HE key, model size, a random
federation id and the operator's public key. Clients calibrate their noise from it and
serve only rounds that match it and carry the operator's signature, so the
``[federation]`` values of ``server.toml`` are written from the same settings and must
not be edited afterwards (provision again to change them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sepals.common.config import EncryptionConfig
from sepals.common.explain_spec import ExplanationSpec
from sepals.common.federation import FederationConfig, sampled_per_round
from sepals.common.files import atomic_write, checkpoint_sha256
from sepals.common.masking import masked_federation
from sepals.common.plan import FederationPlan
from sepals.common.round_signature import generate_operator_key
from sepals.common.scheme import (
    context_fingerprint,
    generate_secret_context,
    make_server_codec,
    public_context_bytes,
)
from sepals.server.control.tls_keys import (
    make_node_keys,
    make_tls,
)

BUNDLE_FILE = "bundle.json"
MANIFEST_FILE = "manifest.json"
CA_CERT = "ca.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
PUBLIC_CONTEXT = "he-public.ctx"
SECRET_CONTEXT = "he-secret.ctx"
NODE_KEY = "node.key"
NODE_PUB = "node.pub"
NODES_DIR = "nodes"
PLAN_FILE = "plan.json"
OPERATOR_KEY = "operator.key"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def sha256_hex(data: bytes) -> str:
    """Full SHA-256 hex digest (for manifests)."""
    return hashlib.sha256(data).hexdigest()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class ProvisionSpec:
    """What to provision.

    Attributes:
        out: Output directory (must be empty or absent).
        clients: Number of client bundles.
        server_host: DNS name or IP address clients use to reach the server; it goes
            into the TLS certificate's SAN.
        port: The SuperLink port clients connect to.
        encryption: HE settings; ``scheme="none"`` writes no HE contexts. A BFV
            configuration's ring is chosen from the model's (trainable) parameter count
            (:meth:`~sepals.common.config.EncryptionConfig.sized_for`): N = 4096 for
            updates of up to 8,192 values, whatever ``poly_modulus_degree`` says; the
            keys, ``server.toml``, every bundle and the plan carry the chosen ring.
        client_prefix: Client bundle names are ``<prefix>-1 ... <prefix>-N``.
        cert_days: Validity of the CA and server certificates.
        keep_ca_key: Also write the CA private key (for issuing certificates later).
        model_parameters: Parameter count of the federation's model, written into the
            plan and the server configuration (0: the default model, the digits MLP
            that ``sepals-sim`` and ``examples/edge_app.py`` train).
        rounds: Rounds the federation runs.
        fraction_train: Fraction of nodes sampled for training each round.
        fraction_evaluate: Fraction of nodes asked for federated evaluation each round.
            0 (the default) turns it off: an evaluating node's loss, metric and example
            count reach the server in the clear, outside any epsilon.
        local_epochs: Local epochs per round.
        batch_size: Expected batch size of DP-SGD.
        learning_rate: Learning rate of round 1.
        lr_schedule: ``cosine`` or ``constant``.
        momentum: Local SGD momentum.
        seed: Seed of the shared round-0 model and of the server's node sampling.
        max_examples: The most ``num-examples`` a node may claim (the server caps each
            reply's FedAvg weight with it; ``[nodes] default_max_examples``).
        masking: Pairwise masks under BFV (on by default; ignored for other schemes, and
            off below two clients per round).
        mask_neighbours: Masking graph degree ``k`` (``None``: the default for the
            clients sampled per round).
        mask_threshold: Masking Shamir threshold ``T`` (``None``: ``floor(2k/3) + 1``).
        noise_shares: Distributed DP noise ``m`` (1: local DP; needs masking with
            ``T >= m``; see :attr:`FederationConfig.noise_shares`).
        pretrained: The pretrained checkpoint (file or directory) the federation starts
            from: its SHA-256 goes into the plan, and every client must hold the same
            bytes. ``model_parameters`` then counts the TRAINABLE parameters only.
        explanation: A private explanation round after training (plan and
            ``server.toml``); its ``targets`` and ``features`` must be set unless the
            federation trains the default model (10 classes of 64 pixels).

    """

    out: Path
    clients: int
    server_host: str
    port: int = 9092
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    client_prefix: str = "client"
    cert_days: int = 365
    keep_ca_key: bool = False
    model_parameters: int = 0
    rounds: int = 30
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    local_epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 0.2
    lr_schedule: str = "cosine"
    momentum: float = 0.9
    seed: int = 0
    max_examples: int = 10000
    masking: bool = True
    mask_neighbours: int | None = None
    mask_threshold: int | None = None
    noise_shares: int = 1
    pretrained: Path | None = None
    explanation: ExplanationSpec | None = None

    def __post_init__(self) -> None:
        if self.explanation is not None and not self.explanation.sized:
            if self.model_parameters != 0:
                raise ValueError(
                    "an explanation round of an own model needs its shape: set the "
                    "explanation's targets and features (--explain-targets, --explain-features)"
                )
            # The default model: the digits MLP, 10 classes of 8x8 pixels.
            sized = replace(self.explanation, targets=self.explanation.targets or 10,
                            features=self.explanation.features or 64)  # fmt: skip
            object.__setattr__(self, "explanation", sized)
        if self.pretrained is not None and not Path(self.pretrained).exists():
            raise ValueError(f"pretrained checkpoint {self.pretrained} does not exist")
        if self.pretrained is not None and self.model_parameters == 0:
            raise ValueError(
                "a pretrained federation needs model_parameters (--model-parameters): the "
                "count of its trainable parameters"
            )
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if not self.server_host or any(c.isspace() for c in self.server_host):
            raise ValueError(f"server_host must be a host name or IP, got {self.server_host!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        if not _NAME.match(self.client_prefix):
            raise ValueError(
                f"client_prefix must match {_NAME.pattern}, got {self.client_prefix!r}"
            )
        if self.encryption.scheme != "none" and self.clients > self.encryption.max_clients:
            raise ValueError(
                f"{self.clients} clients exceed the encryption's max_clients "
                f"{self.encryption.max_clients}; raise max_clients (--max-clients)"
            )
        if self.model_parameters < 0:
            raise ValueError(f"model_parameters must be >= 0, got {self.model_parameters}")
        if self.cert_days < 1:
            raise ValueError(f"cert_days must be >= 1, got {self.cert_days}")
        if self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {self.max_examples}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        _ = self.federation  # validates the training settings

    @property
    def federation(self) -> FederationConfig:
        """The federation's training settings, as ``server.toml`` and the plan hold them.

        Raises:
            ValueError: a setting is out of range (the message names it).

        """
        federation = FederationConfig(
            rounds=self.rounds,
            fraction_train=self.fraction_train,
            min_train_clients=max(1, min(2, self.clients)),
            fraction_evaluate=self.fraction_evaluate,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            lr_schedule=self.lr_schedule,  # type: ignore[arg-type]
            momentum=self.momentum,
            round_timeout=600.0,
            seed=self.seed,
            weight_cap=self.max_examples,
        )
        tuned = self.mask_neighbours is not None or self.mask_threshold is not None
        masked = self.masking and self.encryption.scheme == "bfv"
        if tuned and not masked:
            raise ValueError("mask_neighbours and mask_threshold need masking on and BFV")
        sampled = sampled_per_round(self.clients, self.fraction_train, federation.min_train_clients)
        federation = replace(federation, explanation=self.explanation)
        if not masked or (sampled < 2 and not tuned):
            return replace(federation, noise_shares=self.noise_shares)
        return masked_federation(
            federation, sampled, self.mask_neighbours, self.mask_threshold, self.noise_shares
        )

    @property
    def address(self) -> str:
        """``host:port`` as clients dial it."""
        host = f"[{self.server_host}]" if ":" in self.server_host else self.server_host
        return f"{host}:{self.port}"


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _server_toml(spec: ProvisionSpec, parameters: int) -> str:
    enc = spec.encryption
    encryption = "\n".join(f"{k} = {_toml_value(v)}" for k, v in asdict(enc).items())
    fed = spec.federation
    federation = "\n".join(
        f"{k} = {_toml_value(getattr(fed, k))}"
        for k in (
            "rounds",
            "fraction_train",
            "min_train_clients",
            "fraction_evaluate",
            "round_timeout",
            "local_epochs",
            "batch_size",
            "learning_rate",
            "lr_schedule",
            "momentum",
            "seed",
            "mask_neighbours",
            "mask_threshold",
            "noise_shares",
        )
    )
    return f"""# sepals-server configuration (written by `sepals provision`).
# Relative paths are resolved against this file's directory.

[server]
address = "0.0.0.0:{spec.port}"
state_dir = "state"
ca_cert = "{CA_CERT}"
server_cert = "{SERVER_CERT}"
server_key = "{SERVER_KEY}"
public_context = "{PUBLIC_CONTEXT if enc.scheme != "none" else ""}"
nodes_dir = "{NODES_DIR}"
# The federation's plan (every client holds a copy) and the operator's signing key.
plan = "{PLAN_FILE}"
operator_key = "{OPERATOR_KEY}"

[federation]
# Fixed by the plan: clients refuse any round whose settings differ. Rounds, sampling
# and local training are chosen at provisioning (sepals provision --rounds ...);
# min_train_clients, fraction_evaluate and round_timeout may be changed.
{federation}

{_explanation_toml(fed.explanation)}
[nodes]
# The most num-examples (FedAvg weight) a node's reply may claim.
default_max_examples = {spec.max_examples}

[encryption]
# Must match the provisioned keys (see sepals.common.config.EncryptionConfig).
{encryption}

[model]
# Number of parameters of the model every client trains. The server checks every
# update against it; a client whose model differs is told so by name.
parameters = {parameters}
"""


def _explanation_toml(spec: ExplanationSpec | None) -> str:
    """The ``[federation.explanation]`` table (fixed by the plan), or nothing."""
    if spec is None:
        return ""
    rows = "\n".join(f"{k} = {_toml_value(v)}" for k, v in spec.to_dict().items())
    return (
        "[federation.explanation]\n# A private explanation round after the last round "
        f"(docs/explain.md); fixed by the plan.\n{rows}\n"
    )


def default_model_parameters() -> int:
    """Parameter count of the default model (the digits MLP that sepals-sim trains)."""
    # Only a provision that is not told the parameter count builds the default model
    # (and loads torch for it).
    from sepals.common.data import load_dataset
    from sepals.common.models import num_parameters

    return num_parameters(load_dataset("digits").model_factory()())


@dataclass(frozen=True)
class ProvisionResult:
    """Where the bundles went."""

    out: Path
    server_bundle: Path
    client_bundles: tuple[Path, ...]
    manifest: dict[str, Any]
    plan: FederationPlan


def provision(spec: ProvisionSpec) -> ProvisionResult:
    """Create every key of a federation and write the per-party bundles.

    Raises:
        FileExistsError: ``spec.out`` exists and is not empty (keys are never overwritten).

    """
    out = spec.out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; refusing to overwrite existing keys")
    out.mkdir(parents=True, exist_ok=True)
    ca_pem, ca_key, server_pem, server_key = make_tls(spec.server_host, spec.cert_days)

    parameters = spec.model_parameters or default_model_parameters()
    # BFV keys are made for the ring sized to this model (smallest bytes, still exact).
    spec = replace(spec, encryption=spec.encryption.sized_for(parameters))
    secret_ctx = public_ctx = None
    he_fingerprint = ""
    if spec.encryption.scheme != "none":
        secret_ctx = generate_secret_context(spec.encryption)
        public_ctx = public_context_bytes(secret_ctx)
        he_fingerprint = context_fingerprint(public_ctx).hex()
    codec = make_server_codec(spec.encryption, public_ctx)
    operator_private, operator_public = generate_operator_key()
    plan = FederationPlan.create(
        spec.federation,
        codec.name,
        codec.fingerprint_hex,
        parameters,
        operator_public,
        checkpoint_sha256="" if spec.pretrained is None else checkpoint_sha256(spec.pretrained),
        poly_modulus_degree=codec.poly_modulus_degree,
    )

    server_dir = out / "server"
    names = [f"{spec.client_prefix}-{i}" for i in range(1, spec.clients + 1)]
    nodes: dict[str, str] = {}
    client_dirs: list[Path] = []
    common_info: dict[str, Any] = {
        "server_address": spec.address,
        "ca_sha256": sha256_hex(ca_pem),
        "server_cert_sha256": sha256_hex(server_pem),
        "he_key_fingerprint": he_fingerprint,
        "encryption": asdict(spec.encryption),
        "plan": plan.to_dict(),
    }
    for name in names:
        private, public = make_node_keys()
        nodes[name] = sha256_hex(public.strip())
        cdir = out / "clients" / name
        atomic_write(cdir / CA_CERT, ca_pem)
        atomic_write(cdir / NODE_KEY, private, secret=True)
        atomic_write(cdir / NODE_PUB, public)
        if secret_ctx is not None:
            atomic_write(cdir / SECRET_CONTEXT, secret_ctx, secret=True)
        atomic_write(server_dir / NODES_DIR / f"{name}.pub", public)
        bundle = {"role": "client", "name": name, **common_info, "node_pub_sha256": nodes[name]}
        atomic_write(cdir / BUNDLE_FILE, _json_bytes(bundle))
        client_dirs.append(cdir)

    atomic_write(server_dir / CA_CERT, ca_pem)
    atomic_write(server_dir / SERVER_CERT, server_pem)
    atomic_write(server_dir / SERVER_KEY, server_key, secret=True)
    if public_ctx is not None:
        atomic_write(server_dir / PUBLIC_CONTEXT, public_ctx)
    atomic_write(
        server_dir / BUNDLE_FILE, _json_bytes({"role": "server", **common_info, "nodes": nodes})
    )
    atomic_write(server_dir / OPERATOR_KEY, operator_private, secret=True)
    plan.save(server_dir / PLAN_FILE)
    atomic_write(server_dir / "server.toml", _server_toml(spec, parameters).encode())
    if spec.keep_ca_key:
        atomic_write(out / "ca-private" / "ca.key", ca_key, secret=True)

    manifest = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "server_host": spec.server_host,
        **common_info,
        "he_public_context_sha256": sha256_hex(public_ctx) if public_ctx is not None else "",
        "nodes": nodes,
        "ca_key_kept": spec.keep_ca_key,
    }
    atomic_write(out / MANIFEST_FILE, _json_bytes(manifest))
    return ProvisionResult(out, server_dir, tuple(client_dirs), manifest, plan)
