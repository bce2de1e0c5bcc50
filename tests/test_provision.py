"""Provisioning: what each bundle holds, file modes, certificates and manifests."""

from __future__ import annotations

import ipaddress
import json
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from sepals.cli import main as sepals_main
from sepals.common.config import EncryptionConfig
from sepals.common.errors import SecretKeyExposureError
from sepals.common.federation import FederationConfig
from sepals.common.plan import FederationPlan
from sepals.common.protocol import plan_conflicts
from sepals.common.round_signature import OperatorSigner
from sepals.common.scheme import context_fingerprint, make_client_codec, make_server_codec
from sepals.common.seal_bundle import key_parameters
from sepals.server.control.provision import ProvisionSpec, provision, sha256_hex


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prov") / "bundles"
    provision(ProvisionSpec(out=out, clients=2, server_host="fl.example.org", model_parameters=7))
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secret_files_are_0600_and_public_files_are_not_secret(provisioned: Path) -> None:
    for client in ("client-1", "client-2"):
        cdir = provisioned / "clients" / client
        assert _mode(cdir / "node.key") == 0o600
        assert _mode(cdir / "he-secret.ctx") == 0o600
        assert _mode(cdir / "ca.pem") == 0o644
    assert _mode(provisioned / "server" / "server.key") == 0o600
    assert _mode(provisioned / "server" / "operator.key") == 0o600
    assert not (provisioned / "ca-private").exists(), "the CA key is discarded by default"


def test_server_bundle_holds_no_secret_of_any_client(provisioned: Path) -> None:
    server = provisioned / "server"
    names = {p.name for p in server.rglob("*") if p.is_file()}
    assert "he-secret.ctx" not in names and "node.key" not in names
    clients = {p.name for p in (provisioned / "clients").rglob("*") if p.is_file()}
    assert "operator.key" not in clients, "no client can sign rounds"
    enc = EncryptionConfig().sized_for(7)  # the ring provision picks for the model
    public = (server / "he-public.ctx").read_bytes()
    secret_bytes = (provisioned / "clients/client-1/he-secret.ctx").read_bytes()
    assert not make_server_codec(enc, public).can_decrypt
    assert make_client_codec(enc, secret_bytes).can_decrypt
    with pytest.raises(SecretKeyExposureError):
        make_server_codec(enc, secret_bytes)
    for path in server.rglob("*"):
        if path.is_file():
            assert secret_bytes[-2048:] not in path.read_bytes()


@pytest.mark.parametrize(("parameters", "ring"), [(7, 4096), (2 * 4096 + 1, 8192)])
def test_keys_bundles_and_plan_carry_the_ring_sized_to_the_model(
    tmp_path: Path, parameters: int, ring: int
) -> None:
    out = tmp_path / "bundles"
    result = provision(
        ProvisionSpec(out=out, clients=1, server_host="fl.example.org", model_parameters=parameters)
    )
    assert result.plan.poly_modulus_degree == ring
    bundle = json.loads((out / "clients/client-1/bundle.json").read_text())
    assert bundle["encryption"]["poly_modulus_degree"] == ring
    assert bundle["plan"]["poly_modulus_degree"] == ring
    toml = tomllib.loads((out / "server/server.toml").read_text())
    assert toml["encryption"]["poly_modulus_degree"] == ring
    public = (out / "server/he-public.ctx").read_bytes()
    assert key_parameters(public).poly_modulus_degree == ring
    enc = EncryptionConfig(poly_modulus_degree=ring)
    codec = make_client_codec(enc, (out / "clients/client-1/he-secret.ctx").read_bytes())
    assert codec.fingerprint_hex == result.plan.key_fingerprint


def test_server_certificate_names_the_host_and_chains_to_the_ca(provisioned: Path) -> None:
    server = provisioned / "server"
    cert = x509.load_pem_x509_certificate((server / "server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((server / "ca.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_node_keys_are_p384_openssh_and_registered_with_the_server(provisioned: Path) -> None:
    cdir = provisioned / "clients" / "client-2"
    key = load_ssh_private_key((cdir / "node.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    server_copy = (provisioned / "server" / "nodes" / "client-2.pub").read_bytes()
    assert server_copy == (cdir / "node.pub").read_bytes()
    pub = load_ssh_public_key(server_copy)
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert pub.public_numbers() == key.public_key().public_numbers()
    # Each node has its own key.
    other = (provisioned / "clients" / "client-1" / "node.pub").read_bytes()
    assert other != server_copy


def test_manifest_fingerprints_match_the_files(provisioned: Path) -> None:
    manifest = json.loads((provisioned / "manifest.json").read_text())
    assert manifest["ca_sha256"] == sha256_hex((provisioned / "server/ca.pem").read_bytes())
    public = (provisioned / "server" / "he-public.ctx").read_bytes()
    assert manifest["he_public_context_sha256"] == sha256_hex(public)
    assert manifest["he_key_fingerprint"] == context_fingerprint(public).hex()
    secret = (provisioned / "clients/client-1/he-secret.ctx").read_bytes()
    assert context_fingerprint(secret).hex() == manifest["he_key_fingerprint"]
    for name, digest in manifest["nodes"].items():
        assert sha256_hex((provisioned / "clients" / name / "node.pub").read_bytes().strip()) == (
            digest
        )
    assert manifest["server_address"] == "fl.example.org:9092"
    assert "parameters = 7" in (provisioned / "server" / "server.toml").read_text()


def test_provision_refuses_to_overwrite_keys(provisioned: Path) -> None:
    with pytest.raises(FileExistsError, match="not empty"):
        provision(ProvisionSpec(out=provisioned, clients=1, server_host="x"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clients": 0}, "clients"),
        ({"server_host": "a b"}, "server_host"),
        ({"port": 0}, "port"),
        ({"client_prefix": "../evil"}, "client_prefix"),
        ({"cert_days": 0}, "cert_days"),
        ({"clients": 101}, "max_clients"),
        ({"rounds": 0}, "rounds"),
        ({"fraction_train": 0.0}, "fraction_train"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"max_examples": 0}, "max_examples"),
    ],
)
def test_spec_validation(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = {"out": tmp_path, "clients": 1, "server_host": "h"}
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ProvisionSpec(**base)  # type: ignore[arg-type]


def test_cli_provision_keeps_ca_key_only_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b"
    code = sepals_main(
        [
            "provision",
            "--out",
            str(out),
            "--clients",
            "1",
            "--server-host",
            "10.0.0.5",
            "--keep-ca-key",
            "--model-parameters",
            "11",
            "--scheme",
            "none",
        ]
    )
    assert code == 0
    assert _mode(out / "ca-private" / "ca.key") == 0o600
    assert not (out / "server" / "he-public.ctx").exists()
    assert not (out / "clients" / "client-1" / "he-secret.ctx").exists()
    cert = x509.load_pem_x509_certificate((out / "server" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.5") in san.get_values_for_type(x509.IPAddress)
    assert "client bundle" in capsys.readouterr().out
    assert (
        sepals_main(["provision", "--out", str(out), "--clients", "1", "--server-host", "h"]) == 2
    )


def test_every_bundle_holds_the_same_plan_and_the_server_holds_its_key(provisioned: Path) -> None:
    server = provisioned / "server"
    plan = FederationPlan.load(server / "plan.json")
    assert json.loads((server / "bundle.json").read_text())["plan"] == plan.to_dict()
    for client in ("client-1", "client-2"):
        bundle = json.loads((provisioned / "clients" / client / "bundle.json").read_text())
        assert FederationPlan.from_dict(bundle["plan"]) == plan
    manifest = json.loads((provisioned / "manifest.json").read_text())
    assert plan.key_fingerprint == manifest["he_key_fingerprint"]
    assert (plan.codec, plan.vector_length, plan.rounds) == ("bfv-q2", 7, 30)
    signer = OperatorSigner.for_plan(server / "operator.key", plan)
    assert signer.public_key_hex == plan.operator_key


def test_server_toml_says_what_the_plan_says(provisioned: Path) -> None:
    server = provisioned / "server"
    toml = tomllib.loads((server / "server.toml").read_text())
    plan = FederationPlan.load(server / "plan.json")
    assert toml["server"]["plan"] == "plan.json"
    assert toml["server"]["operator_key"] == "operator.key"
    assert toml["nodes"] == {"default_max_examples": 10000}
    federation = FederationConfig(**toml["federation"])
    assert plan_conflicts(plan, federation, plan.codec, plan.key_fingerprint, 7) == []
    assert toml["model"]["parameters"] == plan.vector_length


def test_cli_provision_sets_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    args = ["provision", "--out", str(out), "--clients", "1", "--server-host", "h"]
    plan_args = [
        "--rounds",
        "5",
        "--fraction-train",
        "0.5",
        "--local-epochs",
        "2",
        "--batch-size",
        "8",
        "--learning-rate",
        "0.05",
        "--max-examples",
        "500",
        "--scheme",
        "none",
        "--model-parameters",
        "9",
    ]
    assert sepals_main(args + plan_args) == 0
    plan = FederationPlan.load(out / "server" / "plan.json")
    assert (plan.rounds, plan.fraction_train, plan.local_epochs) == (5, 0.5, 2)
    assert (plan.batch_size, plan.learning_rate, plan.codec) == (8, 0.05, "plain-fp32")
    toml = tomllib.loads((out / "server" / "server.toml").read_text())
    assert toml["federation"]["rounds"] == 5 and toml["nodes"]["default_max_examples"] == 500
    assert plan.federation_id in capsys.readouterr().out
    for bad, match in (("--rounds=0", "rounds"), ("--fraction-train=1.5", "fraction_train")):
        assert sepals_main([*args[:2], str(tmp_path / bad), *args[3:], bad]) == 2
        assert match in capsys.readouterr().err


def test_each_federation_gets_its_own_id_and_key(provisioned: Path, tmp_path: Path) -> None:
    provision(ProvisionSpec(out=tmp_path / "b", clients=1, server_host="h", model_parameters=7))
    ours = FederationPlan.load(provisioned / "server" / "plan.json")
    theirs = FederationPlan.load(tmp_path / "b" / "server" / "plan.json")
    assert ours.federation_id != theirs.federation_id
    assert ours.operator_key != theirs.operator_key


def test_deployments_evaluate_nowhere_by_default(
    provisioned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A server that asks no node to evaluate receives no per-client loss, accuracy or
    # example count outside of training: the default server.toml asks none.
    toml = tomllib.loads((provisioned / "server" / "server.toml").read_text())
    federation = FederationConfig(**toml["federation"])
    assert federation.fraction_evaluate == 0.0
    assert federation.evaluation_disclosure.startswith("off")
    out = tmp_path / "on"
    args = ["provision", "--out", str(out), "--clients", "1", "--server-host", "h"]
    assert sepals_main([*args, "--scheme", "none", "--model-parameters", "3"]) == 0
    assert "federated evaluation off: no per-client metric" in capsys.readouterr().out
    assert (
        sepals_main([*args[:2], str(tmp_path / "on2"), *args[3:], "--fraction-evaluate", "0.5"])
        == 0
    )
    said = capsys.readouterr().out
    assert "federated evaluation on (0.5 of nodes a round)" in said and "outside epsilon" in said
    toml = tomllib.loads((tmp_path / "on2" / "server" / "server.toml").read_text())
    assert toml["federation"]["fraction_evaluate"] == 0.5
