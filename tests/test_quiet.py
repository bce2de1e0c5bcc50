"""Quiet by default, informative always: each Flower line at most once, no library
chatter from every client every round, and one-line refusals where a raw error was."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from sepals.common.finetune import LoRA, select_trainable
from sepals.common.log import show_flower_once, without_flower_notice
from sepals.simulations.cli import main as sim_main


@pytest.fixture
def flower_logger() -> Iterator[logging.Logger]:
    """Flower's logger with only Flower's own console handler, restored afterwards.

    (Other tests in the same process may have added handlers of their own to it.)
    """
    from flwr.common.logger import ConsoleHandler

    flower = logging.getLogger("flwr")
    saved = (flower.level, flower.propagate, list(flower.filters), list(flower.handlers))
    flower.handlers = [h for h in flower.handlers if isinstance(h, ConsoleHandler)][:1]
    yield flower
    flower.setLevel(saved[0])
    flower.propagate = saved[1]
    flower.filters[:] = saved[2]
    flower.handlers = saved[3]


def _lines_printed(flower: logging.Logger) -> list[str]:
    """What Flower's handler and a root handler (Opacus' basicConfig) print for one line."""
    root = logging.getLogger()
    stream = io.StringIO()
    root_handler = logging.StreamHandler(stream)
    root.addHandler(root_handler)
    from flwr.common.logger import ConsoleHandler

    # pytest's capture handlers may sit there too; Flower's own is the ConsoleHandler.
    own = [h for h in flower.handlers if isinstance(h, ConsoleHandler)]
    assert len(own) == 1, "Flower's own console handler"
    previous = own[0].setStream(stream)
    try:
        flower.info("Starting the strategy")
    finally:
        root.removeHandler(root_handler)
        own[0].setStream(previous)  # type: ignore[arg-type]
    return [ln for ln in stream.getvalue().splitlines() if "Starting the strategy" in ln]


def test_each_flower_line_shows_once_even_with_a_root_handler(
    flower_logger: logging.Logger,
) -> None:
    flower_logger.propagate = True  # as Flower leaves it
    flower_logger.setLevel(logging.DEBUG)
    assert len(_lines_printed(flower_logger)) == 2  # what Opacus' root handler does
    show_flower_once(logging.DEBUG)
    assert len(_lines_printed(flower_logger)) == 1
    show_flower_once(logging.ERROR)  # what sepals-sim and simulate() do unless verbose
    assert _lines_printed(flower_logger) == []


def test_only_the_named_deprecation_notice_is_silenced(
    flower_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    from flwr.common.logger import warn_deprecated_feature

    flower_logger.handlers = []
    flower_logger.propagate = True  # so that caplog sees Flower's records
    with caplog.at_level(logging.WARNING, logger="flwr"):
        with without_flower_notice("run_simulation"):
            warn_deprecated_feature("The `run_simulation` function is deprecated")
            warn_deprecated_feature("Something else")
        warn_deprecated_feature("The `run_simulation` function is deprecated")
    notices = [r.getMessage() for r in caplog.records if "DEPRECATED" in r.getMessage()]
    assert len(notices) == 2
    assert "Something else" in notices[0] and "run_simulation" in notices[1]


@pytest.mark.parametrize(
    "setup",
    [
        # every simulation process (Ray workers and the evaluator inherit it)
        "from sepals.simulations.process_env import apply_process_env as quiet",
        # sepals-client, before it loads the app
        "from sepals.common.log import quiet_libraries as quiet",
    ],
)
def test_hugging_face_loading_bars_and_warnings_stay_quiet(setup: str) -> None:
    """sepals' processes load models with transformers' bars and warnings off.

    transformers draws its "Loading weights" bars only while huggingface_hub's progress
    bars are on, and logs below its verbosity; both are read from the environment.
    """
    pytest.importorskip("transformers")
    probe = setup + textwrap.dedent(
        """
        quiet()
        import transformers.utils.logging as hf
        print(hf.get_verbosity(), hf.is_progress_bar_enabled())
        """
    )
    quiet = ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")
    env = {k: v for k, v in os.environ.items() if k not in quiet}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.split() == [str(logging.ERROR), "False"], out.stdout + out.stderr


def test_peft_warnings_go_to_the_log_once(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("peft")

    class Conv1DNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            from transformers.pytorch_utils import Conv1D

            self.proj = Conv1D(4, 4)  # GPT-2's layer: peft adjusts it and warns

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)  # type: ignore[no-any-return]

    with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.INFO, "sepals"):
        warnings.simplefilter("always")
        for _ in range(3):  # every round of every client builds the model
            select_trainable(Conv1DNet(), LoRA(target_modules=("proj",)))
    assert not [w for w in shown if "peft" in str(w.filename)], [str(w.message) for w in shown]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("peft: ")]
    assert len(logged) == 1 and "fan_in_fan_out" in logged[0]


SEQUENCE_APP = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sepals import EdgeApp, PrivacyConfig


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.out = nn.Linear(8, 16)

    def forward(self, x):
        return self.out(self.embed(x))


def loss(out, y):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def make_app():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (60, 7), generator=g)
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])  # next-token targets: 2-D
    return EdgeApp(
        model_factory=TinyLM,
        train_data=data,
        test_data=data,
        loss_fn=loss,
        privacy=PrivacyConfig(target_epsilon=8.0, delta=1e-5),
    )
"""


def test_the_audit_refuses_sequence_targets_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = tmp_path / "tiny_lm.py"
    app.write_text(SEQUENCE_APP)
    code = sim_main(
        [
            *("--app", f"{app}:make_app", "--audit", "8", "--clients", "2", "--rounds", "1"),
            *("--out", str(tmp_path / "run")),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "one class label per example" in err and ", 6)" in err
