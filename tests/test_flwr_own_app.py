"""Own apps through ``flwr run .``, and the run shows whether the model learned.

``flwr run . --run-config "app='examples/regression_app.py:make_app'"`` runs an own
``EdgeApp`` as ``sepals-sim --app`` does: Flower accepts the key (it is in the app's
``[tool.flwr.app.config]``), a bad spec fails at once with one clear line, and the
ServerApp evaluates each round's model centrally, in its key-holding helper process, so
the closing line shows a score instead of "n/a".
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import fuse_dicts, parse_config_args
from flwr.supercore.utils import get_flwr_home

from sepals.common.plan import FederationPlan
from sepals.simulations.flwr_app import FlowerJob, client_app, server_app
from sepals.simulations.flwr_eval import resolve_app_spec

ROOT = Path(__file__).resolve().parents[1]
SPEC = "examples/regression_app.py:make_app"


def _defaults() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        config: dict[str, object] = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    return config


def test_flower_accepts_the_app_run_config() -> None:
    """The SuperLink fuses --run-config into the app's defaults and refuses unknown keys."""
    override = parse_config_args([f"app='{SPEC}' app-args='' rounds=2"])
    fused = fuse_dicts(_defaults(), override)  # raises on a key the app lacks
    job = FlowerJob.from_run_config(fused)
    assert job.app == SPEC and job.federation.rounds == 2
    assert FlowerJob.from_run_config({"app": SPEC, "app-args": "a=1, b = x"}).app_args == (
        ("a", "1"),
        ("b", "x"),
    )
    with pytest.raises(ValueError, match="'app-args' needs 'app'"):
        FlowerJob.from_run_config({"app-args": "a=1"})


def test_a_relative_app_is_found_in_the_installed_app_or_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    installed = get_flwr_home() / "apps" / "sepals.sepals.0.1.0.abcdef01"
    (installed / "examples").mkdir(parents=True)
    (installed / "examples" / "mine.py").write_text("")
    monkeypatch.syspath_prepend(str(installed))  # as Flower does when it loads the app
    monkeypatch.chdir(ROOT)
    assert resolve_app_spec("examples/mine.py:make") == f"{installed}/examples/mine.py:make"
    assert resolve_app_spec(SPEC) == f"{ROOT}/{SPEC}"
    assert resolve_app_spec("pkg.module:attr") == "pkg.module:attr"
    with pytest.raises(ValueError, match=r"no file examples/none\.py in .*apps"):
        resolve_app_spec("examples/none.py:make")
    with pytest.raises(ValueError, match="must be 'module:attr'"):
        resolve_app_spec("examples/mine.py")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("examples/nothing_here.py:make_app", "no file examples/nothing_here.py"),
        ("examples/regression_app.py:no_such", "has no attribute 'no_such'"),
        ("examples/regression_app.py", "must be 'module:attr'"),
    ],
)
def test_a_bad_app_spec_is_one_clear_line_before_anything_waits(
    spec: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from test_flower_way import FakeGrid

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.chdir(ROOT)
    context = Context(
        run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config={"app": spec}
    )
    with caplog.at_level(logging.ERROR, logger="sepals"), pytest.raises(ValueError, match=message):
        server_app(FakeGrid(nodes=[]), context)  # type: ignore[arg-type]  # no node: no wait
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors


@pytest.mark.usefixtures("run_identity")
def test_flowers_apps_run_an_own_app_and_evaluate_it_centrally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The ServerApp and ClientApp objects of ``flwr run .``, in-process, on the README's app."""
    from test_flower_way import FakeGrid

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.chdir(ROOT)
    run_config = {"app": SPEC, "rounds": 1, "lr": 0.1, "batch-size": 16, "fraction-evaluate": 1.0}
    grid = FakeGrid(client_app, nodes=[31, 32])
    grid.contexts = {
        n: Context(
            run_id=93,
            node_id=n,
            node_config={"partition-id": i, "num-partitions": 2},
            state=RecordDict(),
            run_config=run_config,
        )
        for i, n in enumerate(grid.nodes)
    }
    server = Context(
        run_id=93, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    with caplog.at_level(logging.INFO, logger="sepals"):
        server_app(grid, server)  # type: ignore[arg-type]
    plan = FederationPlan.load(tmp_path / "flwr-home" / "sepals-runs" / "93" / "plan.json")
    assert plan.vector_length == 10 * 16 + 16 + 16 + 1  # the regression app's MLP (193)
    lines = [r.getMessage() for r in caplog.records]
    assert any("regression_app.py:make_app on 2 nodes" in ln for ln in lines), lines
    rounds = [ln for ln in lines if "on the held-out test split (central)" in ln]
    assert [ln.split(":")[1].strip() for ln in rounds] == ["round 0/1", "round 1/1"], rounds
    closing = next(ln for ln in lines if "rounds aggregated" in ln)
    assert "1 of 1 rounds aggregated" in closing
    assert "r2 " in closing and "r2 n/a" not in closing and "central" in closing, closing
    # With fraction-evaluate, the clients' own scores too (federated evaluation).
    assert "federated r2 " in closing and "federated r2 n/a" not in closing, closing
    assert any("federated evaluation on" in ln for ln in lines), lines
    # The evaluator helper held the key; it is gone with the run.
    assert not list((tmp_path / "flwr-home").glob("sepals-runs/*/keys/clients.secret"))
