"""Pretrained starting points and trainable parts: checkpoints, freezing, LoRA, refusal."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_util import plain_plan
from torch import nn
from torch.utils.data import TensorDataset

from sepals.client.core import ClientRuntime, SepalsClient, check_checkpoint
from sepals.client.edge import EdgeClient
from sepals.client.edge_app import EdgeApp
from sepals.client.privacy import PrivacyLedger, poisson_schedule
from sepals.client.secret_random import DpRandomness
from sepals.client.training import TrainSettings, model_builder, train_round
from sepals.common.config import EncryptionConfig, PrivacyConfig
from sepals.common.errors import ModelCompatibilityError
from sepals.common.files import checkpoint_sha256
from sepals.common.finetune import (
    LoRA,
    ParameterCounts,
    check_trainable,
    describe_trainable,
    select_trainable,
)
from sepals.common.models import build_seeded, get_flat
from sepals.common.plan import FederationPlan, PlanViolationError
from sepals.server.control.provision import ProvisionSpec, provision


class Net(nn.Module):
    """A backbone and a head, as a pretrained model would have."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


HEAD = 16 * 3 + 3


def _checkpoint(path: Path, seed: int = 7) -> Path:
    torch.manual_seed(seed)
    torch.save(Net().state_dict(), path)
    return path


def _data(n: int = 48) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def _plan(vector_length: int, sha: str = "") -> FederationPlan:
    return plain_plan(vector_length, sha)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_digest_covers_every_byte_and_name(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "a.pt")
    first = checkpoint_sha256(ckpt)
    assert len(first) == 64 and first == checkpoint_sha256(ckpt)
    raw = bytearray(ckpt.read_bytes())
    raw[-30] ^= 1
    ckpt.write_bytes(bytes(raw))
    assert checkpoint_sha256(ckpt) != first
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "weights.bin").write_bytes(b"\x00" * 10)
    digest = checkpoint_sha256(folder)
    (folder / "weights.bin").rename(folder / "weights2.bin")
    assert checkpoint_sha256(folder) != digest
    (folder / "weights2.bin").rename(folder / "weights.bin")
    assert checkpoint_sha256(folder) == digest
    (folder / "extra").write_text("x")
    assert checkpoint_sha256(folder) != digest
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint_sha256(tmp_path / "missing")


def test_the_checkpoint_is_loaded_and_frozen_parts_stay_pretrained(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "net.pt")
    saved = torch.load(ckpt, weights_only=True)
    factory = model_builder(Net, ckpt, ("head.*",))
    model = factory()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    counts = ParameterCounts.of(model)
    assert counts.trainable == HEAD and counts.total == 8 * 16 + 16 + 16 * 16 + 16 + HEAD
    assert get_flat(model).shape == (HEAD,)
    assert counts.to_dict()["trainable_fp32_bytes"] == 4 * HEAD


def test_a_checkpoint_that_does_not_fit_is_refused_by_name(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "net.pt")
    wider = lambda: nn.Sequential(nn.Linear(8, 4))  # noqa: E731
    with pytest.raises(ModelCompatibilityError, match="lacks: features"):
        model_builder(wider, ckpt)()
    state = torch.load(ckpt, weights_only=True)
    state["head.weight"] = torch.zeros(5, 16)
    torch.save(state, tmp_path / "bad.pt")

    class Head5(Net):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(16, 3)

    with pytest.raises(ModelCompatibilityError, match=r"head.weight has shape \(5, 16\)"):
        model_builder(Head5, tmp_path / "bad.pt")()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelCompatibilityError, match="not a torch state_dict"):
        model_builder(Net, tmp_path / "junk.pt")()
    with pytest.raises(ValueError, match="must take its path"):
        model_builder(Net, tmp_path)


def test_keys_a_checkpoint_leaves_out_are_equal_on_every_party(tmp_path: Path) -> None:
    # A new head: the checkpoint holds the backbone only. Unseeded builds still agree.
    state = {k: v for k, v in Net().state_dict().items() if k.startswith("features")}
    torch.save(state, tmp_path / "backbone.pt")
    factory = model_builder(Net, tmp_path / "backbone.pt", ("head.*",))
    torch.manual_seed(1)
    a = factory().state_dict()
    torch.manual_seed(2)
    b = factory().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batchnorm_in_a_pretrained_model_is_one_line_with_the_fix(tmp_path: Path) -> None:
    def with_bn() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))

    torch.save(with_bn().state_dict(), tmp_path / "bn.pt")
    # Frozen or not: BatchNorm mixes the examples of a batch.
    with pytest.raises(ModelCompatibilityError) as err:
        model_builder(with_bn, tmp_path / "bn.pt", ("2.*",))()
    message = str(err.value)
    assert "'1' (BatchNorm1d)" in message and "GroupNorm" in message
    assert "ModuleValidator.fix" in message and "\n" not in message
    # Without a checkpoint, nothing pretrained is lost: the layer is fixed automatically.
    fixed = model_builder(with_bn)()
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fixed.modules())


# --------------------------------------------------------------------------- trainable
def test_trainable_patterns_are_checked() -> None:
    assert check_trainable(["head.*"]) == ("head.*",)
    assert check_trainable(None) is None
    for bad in ("head.*", [], [""], 3):
        with pytest.raises(ValueError):
            check_trainable(bad)
    with pytest.raises(ModelCompatibilityError, match=r"'hed\.\*' matches no parameter"):
        select_trainable(Net(), ("hed.*",))
    assert describe_trainable(("head.*", "features.2.*")) == "head.*,features.2.*"
    assert describe_trainable(None) == "all"
    for kwargs in ({"r": 0}, {"alpha": 0}, {"target_modules": ()}, {"dropout": 1.0}):
        with pytest.raises(ValueError):
            LoRA(**{"target_modules": ("0",), **kwargs})  # type: ignore[arg-type]


def test_only_the_trainable_part_is_trained_noised_and_sent(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "net.pt")
    factory = model_builder(Net, ckpt, ("head.*",))
    privacy = PrivacyConfig(target_epsilon=4.0, delta=1e-5)
    settings = TrainSettings(batch_size=8, learning_rate=0.5, randomness=DpRandomness(3))
    data = _data()
    q, steps = poisson_schedule(len(data), settings.batch_size, settings.epochs)
    ledger = PrivacyLedger.empty(privacy).calibrated(privacy, q, steps, 2)
    start = get_flat(build_seeded(factory, 0))
    out = train_round(factory, start, data, settings, privacy, ledger, 1)
    assert out.weights.shape == (HEAD,)
    assert not np.allclose(out.weights, start)
    assert out.ledger.epsilon is not None and 0 < out.ledger.epsilon <= 4.0
    # Loading the new head back leaves the backbone exactly as pretrained.
    saved = torch.load(ckpt, weights_only=True)
    model = factory()
    from sepals.common.models import set_flat

    set_flat(model, out.weights)
    for name, tensor in model.state_dict().items():
        if name.startswith("features"):
            assert torch.equal(tensor, saved[name])


def test_lora_adapts_linear_layers_and_trains_under_dp(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "net.pt")
    spec = LoRA(r=2, alpha=4, target_modules=("features.0", "features.2"), train_also=("head.*",))
    factory = model_builder(Net, ckpt, spec)
    model = factory()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    lora = 2 * (8 + 16) + 2 * (16 + 16)  # A: r x in, B: out x r, for both layers
    assert ParameterCounts.of(model).trainable == lora + HEAD
    # The federation's model seed chooses the adapters; the base stays the checkpoint's.
    a, b = get_flat(build_seeded(factory, 0)), get_flat(build_seeded(factory, 0))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, get_flat(build_seeded(factory, 1)))
    privacy = PrivacyConfig(target_epsilon=8.0, delta=1e-5)
    settings = TrainSettings(batch_size=8, learning_rate=0.5, randomness=DpRandomness(1))
    data = _data()
    q, steps = poisson_schedule(len(data), settings.batch_size, settings.epochs)
    ledger = PrivacyLedger.empty(privacy).calibrated(privacy, q, steps, 1)
    out = train_round(factory, a, data, settings, privacy, ledger, 1)
    assert out.weights.shape == a.shape and not np.allclose(out.weights, a)
    assert out.ledger.epsilon is not None and out.ledger.epsilon <= 8.0
    with pytest.raises(ModelCompatibilityError, match="fit no layer"):
        model_builder(Net, ckpt, LoRA(target_modules=("nothing_here",)))()


# --------------------------------------------------------------------------- refusal
def test_a_client_refuses_a_checkpoint_the_plan_does_not_name(tmp_path: Path) -> None:
    ours = _checkpoint(tmp_path / "ours.pt", seed=1)
    theirs = _checkpoint(tmp_path / "theirs.pt", seed=2)
    plan = _plan(HEAD, checkpoint_sha256(ours))
    check_checkpoint(plan, ours)
    with pytest.raises(PlanViolationError, match="checkpoint mismatch") as err:
        check_checkpoint(plan, theirs)
    assert err.value.reason == "pretrained checkpoint mismatch"
    with pytest.raises(PlanViolationError, match="checkpoint missing"):
        check_checkpoint(plan, None)
    with pytest.raises(PlanViolationError, match="not in plan"):
        check_checkpoint(dataclasses.replace(plan, checkpoint_sha256=""), ours)

    def runtime(path: Path) -> ClientRuntime:
        return ClientRuntime(
            client_id="c",
            model_factory=Net,
            train_data=_data(),
            test_data=None,
            privacy=PrivacyConfig(target_epsilon=8.0),
            encryption=EncryptionConfig(scheme="none"),
            plan=plan,
            pretrained=path,
            trainable=("head.*",),
        )

    SepalsClient(runtime(ours))
    with pytest.raises(PlanViolationError, match="mismatch"):
        SepalsClient(runtime(theirs))


def test_plan_carries_the_checkpoint_digest() -> None:
    plan = _plan(10, "ab" * 32)
    assert FederationPlan.from_json(plan.to_json()) == plan
    old = plan.to_dict()
    del old["checkpoint_sha256"]  # plans written before fine-tuning existed
    assert FederationPlan.from_dict(old).checkpoint_sha256 == ""
    with pytest.raises(ValueError, match=r"plan\.checkpoint_sha256"):
        dataclasses.replace(plan, checkpoint_sha256="xyz")


def test_an_edge_client_with_another_checkpoint_refuses_to_join(tmp_path: Path) -> None:
    ours = _checkpoint(tmp_path / "ours.pt", seed=1)
    out = tmp_path / "bundles"
    provision(
        ProvisionSpec(
            out=out,
            clients=1,
            server_host="127.0.0.1",
            encryption=EncryptionConfig(scheme="none"),
            model_parameters=HEAD,
            pretrained=ours,
        )
    )
    bundle = out / "clients" / "client-1"
    app = EdgeApp(model_factory=Net, train_data=_data(), pretrained=ours, trainable=("head.*",))
    with EdgeClient(bundle, app, ledger_path=tmp_path / "l.json"):
        pass
    local = tmp_path / "local-copy.pt"
    raw = bytearray(ours.read_bytes())
    raw[-30] ^= 1  # one flipped bit in the client's copy
    local.write_bytes(bytes(raw))
    tampered = dataclasses.replace(app, pretrained=local)
    with pytest.raises(PlanViolationError, match="checkpoint mismatch"):
        EdgeClient(bundle, tampered, ledger_path=tmp_path / "l2.json")
    with pytest.raises(ValueError, match="model_parameters"):
        ProvisionSpec(out=tmp_path / "x", clients=1, server_host="h", pretrained=ours)


def test_clients_share_one_gpu_in_equal_fractions() -> None:
    from sepals.simulations.clients import client_resources

    assert client_resources(4, on_gpu=True) == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert client_resources(16, on_gpu=False)["num_gpus"] == 0.0
    with pytest.raises(ValueError):
        client_resources(0, on_gpu=True)
