"""What sepals changes in a model, and what a checkpoint supplied, are said out loud.

* a layer replaced for DP-SGD (BatchNorm -> GroupNorm) is named in the start line and
  the report, the saved model carries the note, and ``sepals.load_model`` rebuilds it;
* a checkpoint's share of the model is counted in the start line and the report, and
  one that supplies none of the frozen parameters (an empty ``{}``) is refused;
* ``sepals-sim`` refuses a checkpoint that does not fit in one line, exit 2, before
  any helper process or Ray starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sepals
from sepals.client.edge_app import EdgeApp
from sepals.common.config import PrivacyConfig
from sepals.common.errors import ModelCompatibilityError
from sepals.common.model_changes import SAVED_MODEL_NOTE, dp_replacements
from sepals.common.models import get_flat
from sepals.simulations import evaluator
from sepals.simulations.cli import main as sim_main
from sepals.simulations.model_info import describe_model, saved_model_note
from sepals.simulations.progress import model_text


class BatchNormNet(nn.Module):
    """A user's model with BatchNorm, as a stock Flower example has."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn1(self.fc1(x))))  # type: ignore[no-any-return]


class Backbone(nn.Module):
    """A pretrained backbone and a new head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # type: ignore[no-any-return]


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))


def _app(factory: Any, **extra: Any) -> EdgeApp:
    return EdgeApp(
        model_factory=factory,
        train_data=_data(),
        test_data=_data(),
        privacy=PrivacyConfig(target_epsilon=8.0),
        **extra,
    )


def test_a_replaced_layer_is_announced_and_the_saved_model_rebuilds(tmp_path: Path) -> None:
    assert dp_replacements(BatchNormNet) == ("bn1: BatchNorm1d -> GroupNorm",)
    assert dp_replacements(Backbone) == ()
    app = _app(BatchNormNet)
    info, counts = describe_model(app, app.build_model_factory())
    assert info["replaced_layers"] == ["bn1: BatchNorm1d -> GroupNorm"]
    assert "ModuleValidator.fix(YourModel())" in info["rebuild"]
    assert "sepals.load_model" in info["rebuild"]
    # The start line says so.
    assert "for DP-SGD: BatchNorm1d -> GroupNorm at bn1" in model_text(info)
    # The saved model says so, and sepals.load_model rebuilds it with its weights.
    trained = app.build_model_factory()()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    evaluator._EVAL_STATE.update(factory=app.build_model_factory(), latest=get_flat(trained))
    path = tmp_path / "model.pt"
    evaluator.evaluator_save(str(path), saved_model_note(info))
    state = torch.load(path, weights_only=True)
    assert state._metadata[SAVED_MODEL_NOTE]["replaced_layers"] == info["replaced_layers"]
    with pytest.raises(RuntimeError, match="running_mean"):
        BatchNormNet().load_state_dict(state)  # what the docs warn about
    for source in (BatchNormNet, app):
        model = sepals.load_model(path, source)
        assert np.array_equal(get_flat(model), get_flat(trained))
    assert counts.total == sum(p.numel() for p in trained.parameters())


def test_a_model_without_replacements_says_nothing_of_them() -> None:
    app = _app(Backbone)
    info, _ = describe_model(app, app.build_model_factory())
    assert info["replaced_layers"] == [] and info["rebuild"] == ""
    assert info["checkpoint_supplied"] is None
    assert "for DP-SGD" not in model_text(info) and "from the checkpoint" not in model_text(info)


def test_what_a_checkpoint_supplied_is_counted(tmp_path: Path) -> None:
    backbone = {k: v for k, v in Backbone().state_dict().items() if k.startswith("features")}
    torch.save(backbone, tmp_path / "backbone.pt")
    app = _app(Backbone, pretrained=str(tmp_path / "backbone.pt"), trainable=("head.*",))
    info, counts = describe_model(app, app.build_model_factory())
    assert info["checkpoint_supplied"] == {
        "supplied": 6 * 8 + 8,
        "total": counts.total,
        "frozen_supplied": 6 * 8 + 8,
        "frozen": 6 * 8 + 8,
    }
    assert "pretrained model (56 of 83 parameters from the checkpoint)" in model_text(info)


def test_a_checkpoint_that_supplies_no_frozen_parameter_is_refused(tmp_path: Path) -> None:
    torch.save({}, tmp_path / "empty.pt")
    head_only = {k: v for k, v in Backbone().state_dict().items() if k.startswith("head")}
    torch.save(head_only, tmp_path / "head.pt")
    cases = (("empty.pt", ("head.*",)), ("empty.pt", None), ("head.pt", ("head.*",)))
    for name, trainable in cases:
        app = _app(Backbone, pretrained=str(tmp_path / name), trainable=trainable)
        with pytest.raises(ModelCompatibilityError, match="supplies") as err:
            app.build_model_factory()()
        assert name in str(err.value) and "\n" not in str(err.value)


def test_sepals_sim_refuses_a_checkpoint_in_one_line_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import flwr.simulation

    import sepals.simulations.harness as harness

    def started(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a process started before the checkpoint was checked")

    monkeypatch.setattr(flwr.simulation, "run_simulation", started)
    monkeypatch.setattr(harness, "HelperProcess", started, raising=False)
    app = tmp_path / "app.py"
    app.write_text(
        "from test_model_changes import Backbone, _app\n"
        "def make_app():\n    return _app(Backbone, trainable=('head.*',))\n"
    )
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    torch.save({}, tmp_path / "empty.pt")
    wrong = {"features.0.weight": torch.zeros(3, 3)}
    torch.save(wrong, tmp_path / "wrong.pt")
    for name, message in (("empty.pt", "none of the model's 83"), ("wrong.pt", "shape (3, 3)")):
        argv = ["--app", f"{app}:make_app", "--pretrained", str(tmp_path / name)]
        code = sim_main([*argv, "--rounds", "1", "--clients", "2", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert message in err and len(err.splitlines()) == 1, err
