"""A Hugging Face transformer from a local ``save_pretrained`` folder, fine-tuned with LoRA.

The model is the tiny BERT of ``examples/text_lora_app.py``; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from dp_util import plain_plan
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("peft")

from sepals.client.core import check_checkpoint
from sepals.client.edge_app import EdgeApp
from sepals.client.privacy import PrivacyLedger, poisson_schedule
from sepals.client.secret_random import DpRandomness
from sepals.client.training import TrainSettings, train_round
from sepals.common.config import PrivacyConfig
from sepals.common.files import checkpoint_sha256
from sepals.common.finetune import LoRA, ParameterCounts
from sepals.common.models import build_seeded, get_flat, set_flat
from sepals.common.plan import FederationPlan, PlanViolationError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "text_lora_app.py"
HIDDEN, LAYERS, LABELS = 32, 2, 2


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("text_lora_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["text_lora_app"] = module
    spec.loader.exec_module(module)
    return module


app_module = _load_example()


@pytest.fixture(scope="module")
def seeded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example's BERT as a fixed seeded init (no pretraining steps): fast."""
    return app_module.write_checkpoint(tmp_path_factory.mktemp("hf") / "bert", steps=0)


def _lora(r: int = 4) -> LoRA:
    return LoRA(r=r, alpha=2 * r, target_modules=("query", "value"), train_also=("*classifier*",))


def _app(checkpoint: Path, spec: LoRA | None = None, n: int = 128) -> EdgeApp:
    return EdgeApp(
        model_factory=app_module.make_model,
        train_data=app_module.sentences(n, seed=3),
        privacy=PrivacyConfig(target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0),
        pretrained=checkpoint,
        trainable=spec or _lora(),
    )


def _frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- building
@pytest.mark.parametrize("r", [2, 4])
def test_only_lora_and_the_head_are_trainable(seeded_checkpoint: Path, r: int) -> None:
    factory = _app(seeded_checkpoint, _lora(r)).build_model_factory()
    model = factory()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".classifier." in n for n in trainable)
    assert sum(".classifier." in n for n in trainable) == 2  # weight and bias
    # Per layer, query and value each gain A (r x hidden) and B (hidden x r).
    lora = LAYERS * 2 * (r * HIDDEN + HIDDEN * r)
    head = HIDDEN * LABELS + LABELS
    counts = ParameterCounts.of(model)
    assert counts.trainable == lora + head
    base = ParameterCounts.of(app_module.make_model(str(seeded_checkpoint)))
    assert counts.total == base.total + lora
    assert counts.trainable < counts.total // 10
    assert get_flat(model).shape == (counts.trainable,)
    with torch.no_grad():
        logits = model(app_module.sentences(5, seed=0).tensors[0])
    assert logits.shape == (5, LABELS)


def test_frozen_weights_are_the_checkpoints_and_adapters_follow_the_seed(
    seeded_checkpoint: Path,
) -> None:
    from safetensors.torch import load_file

    factory = _app(seeded_checkpoint).build_model_factory()
    torch.manual_seed(11)
    a = factory()
    torch.manual_seed(11)
    b = factory()
    torch.manual_seed(12)
    c = factory()
    frozen_a, frozen_b, frozen_c = _frozen(a), _frozen(b), _frozen(c)
    assert frozen_a.keys() == frozen_b.keys() == frozen_c.keys()
    assert all(torch.equal(frozen_a[k], frozen_b[k]) for k in frozen_a)
    assert all(torch.equal(frozen_a[k], frozen_c[k]) for k in frozen_a)  # seed-independent
    ad_a, ad_b, ad_c = _adapters(a), _adapters(b), _adapters(c)
    assert all(torch.equal(ad_a[k], ad_b[k]) for k in ad_a)
    assert any(not torch.equal(ad_a[k], ad_c[k]) for k in ad_a if "lora_A" in k)
    assert np.array_equal(get_flat(build_seeded(factory, 0)), get_flat(build_seeded(factory, 0)))
    # Every frozen tensor is the saved one (peft renames an adapted x.weight to
    # x.base_layer.weight), and the checkpoint sets every base parameter.
    saved = load_file(str(seeded_checkpoint / "model.safetensors"))
    for name, tensor in frozen_a.items():
        key = name.removeprefix("hf.").replace(".base_layer.", ".")
        assert key in saved, name
        assert torch.equal(tensor, saved[key]), name
    # The head is trainable but starts as the checkpoint's; only the adapters are new.
    head = {n: t for n, t in ad_a.items() if "lora_" not in n}
    assert sorted(head) == ["hf.classifier.bias", "hf.classifier.weight"]
    assert all(torch.equal(t, saved[n.removeprefix("hf.")]) for n, t in head.items())
    assert len(frozen_a) + len(head) == len(saved)


# --------------------------------------------------------------------------- training
def test_a_dp_round_moves_only_the_trainable_parameters(seeded_checkpoint: Path) -> None:
    app = _app(seeded_checkpoint, n=192)
    base = app.build_model_factory()
    built: list[nn.Module] = []

    def factory() -> nn.Module:
        model = base()
        built.append(model)
        return model

    reference = base()
    start = get_flat(build_seeded(base, 0))
    privacy = app.privacy
    settings = TrainSettings(batch_size=32, learning_rate=0.3, randomness=DpRandomness(1))
    data = app.train_dataset
    assert data is not None
    q, steps = poisson_schedule(len(data), settings.batch_size, settings.epochs)  # type: ignore[arg-type]
    ledger = PrivacyLedger.empty(privacy).calibrated(privacy, q, steps, 2)
    out = train_round(factory, start, data, settings, privacy, ledger, 1)
    assert out.weights.shape == start.shape and np.isfinite(out.weights).all()
    assert not np.allclose(out.weights, start)
    assert out.ledger.epsilon is not None and math.isfinite(out.ledger.epsilon)
    assert 0 < out.ledger.epsilon <= privacy.target_epsilon  # type: ignore[operator]
    assert out.steps > 0 and math.isfinite(out.mean_loss)
    # The model trained in the round: frozen parameters bit-identical to the
    # checkpoint's, trainable ones exactly the returned vector.
    assert built, "train_round did not build the model through the factory"
    trained = built[-1]
    want = _frozen(reference)
    got = _frozen(trained)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert np.array_equal(get_flat(trained), out.weights)
    # Both LoRA factors and the head moved (B starts at zero).
    moved = {n for n, p in _adapters(trained).items() if p.abs().sum() > 0}
    assert any("lora_B" in n for n in moved) and any("classifier" in n for n in moved)
    # The result loads back into a fresh build, leaving the backbone as it was.
    fresh = base()
    set_flat(fresh, out.weights)
    assert all(torch.equal(_frozen(fresh)[k], want[k]) for k in want)


def test_the_example_app_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no checkpoint directory"):
        app_module.make_app(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="partition must be"):
        app_module.make_app(str(tmp_path), partition="3", partitions="3")


def test_the_example_app_splits_its_private_data(seeded_checkpoint: Path) -> None:
    apps = [app_module.make_app(str(seeded_checkpoint), str(i), "3") for i in range(3)]
    whole = app_module.make_app(str(seeded_checkpoint))
    sizes = [len(a.train_dataset) + len(a.test_dataset) for a in apps]  # type: ignore[arg-type]
    assert sum(sizes) == len(whole.train_dataset) + len(whole.test_dataset)  # type: ignore[arg-type]
    assert whole.trainable == app_module.TRAINABLE
    labels = whole.train_dataset.tensors[1]  # type: ignore[union-attr]
    assert 0.35 < float(labels.float().mean()) < 0.65


# --------------------------------------------------------------------------- refusal
def _plan(vector_length: int, sha: str = "") -> FederationPlan:
    return plain_plan(vector_length, sha)


@pytest.mark.parametrize("edit", ["weights", "config"])
def test_a_checkpoint_folder_changed_after_the_plan_is_refused(
    seeded_checkpoint: Path, tmp_path: Path, edit: str
) -> None:
    ours = tmp_path / "ours"
    shutil.copytree(seeded_checkpoint, ours)
    sha = checkpoint_sha256(ours)
    assert sha == checkpoint_sha256(seeded_checkpoint)  # a copy has the same digest
    vector = ParameterCounts.of(_app(ours).build_model_factory()()).trainable
    plan = dataclasses.replace(_plan(vector), checkpoint_sha256=sha)
    check_checkpoint(plan, ours)
    if edit == "weights":
        target = ours / "model.safetensors"
        raw = bytearray(target.read_bytes())
        raw[-5] ^= 1  # one bit of one weight
        target.write_bytes(bytes(raw))
    else:
        target = ours / "config.json"
        text = target.read_text()
        assert '"hidden_act": "gelu"' in text
        target.write_text(text.replace('"hidden_act": "gelu"', '"hidden_act": "relu"'))
    assert checkpoint_sha256(ours) != sha
    with pytest.raises(PlanViolationError, match="mismatch") as err:
        check_checkpoint(plan, ours)
    assert err.value.reason == "pretrained checkpoint mismatch"
    # The untouched original still passes.
    check_checkpoint(plan, seeded_checkpoint)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def pretrained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example's checkpoint, pretrained for fewer steps than ``__main__`` takes."""
    return app_module.write_checkpoint(
        tmp_path_factory.mktemp("hf") / "bert", steps=100, quiet=True
    )


@pytest.mark.slow
def test_simulate_the_example_private_encrypted_and_masked(
    pretrained_checkpoint: Path, tmp_path: Path
) -> None:
    from sepals.simulations import simulate

    rows: list[dict[str, object]] = []
    rounds = 2
    report, model = simulate(
        f"{EXAMPLE}:make_app",
        app_args={"checkpoint": str(pretrained_checkpoint)},
        clients=3,
        rounds=rounds,
        encryption="bfv",
        learning_rate=0.3,
        batch_size=64,
        cpus=2,
        device="cpu",
        out=tmp_path / "run",
        progress=rows.append,
    )
    final = report["final"]
    assert final["aggregated_rounds"] == rounds
    assert final["codec"].startswith("bfv")
    assert final["masking"]["rounds_masks_removed"] == rounds
    budget = 8.0
    assert len(report["clients"]) == 3
    assert all(0 < c["epsilon"] <= budget for c in report["clients"])
    assert 0 < final["epsilon"] <= budget
    info = report["config"]["model"]
    counts = info["parameters"]
    assert 0 < counts["trainable"] < counts["total"]
    assert counts["trainable"] == ParameterCounts.of(model).trainable
    assert info["trainable"].startswith("lora(r=4, alpha=8, query,value)")
    assert info["checkpoint_sha256"] == checkpoint_sha256(pretrained_checkpoint)
    assert len(report["rounds"]) == rounds
    for row in report["rounds"]:
        assert row["upload_bytes_per_client"] > 0
        assert row["trainable_parameters"] == counts["trainable"]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    # Private fine-tuning helps: the test loss falls (it starts near 0.9).
    assert final["loss"] < report["initial"]["loss"]
    # The returned model is the final global model, the backbone still the checkpoint's.
    from safetensors.torch import load_file

    saved = load_file(str(pretrained_checkpoint / "model.safetensors"))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            key = name.removeprefix("hf.").replace(".base_layer.", ".")
            assert torch.equal(p.detach(), saved[key]), name
