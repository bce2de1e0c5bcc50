"""Secret keys stay out of git's way.

Provisioning output and run folders hold the HE secret context, node keys and the
operator's key: the repository ignores them by default, and ``sepals provision`` warns
(one line) when it writes them inside a git work tree.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sepals.cli import main as sepals_main
from sepals.common.files import git_work_tree

ROOT = Path(__file__).resolve().parents[1]
GIT = shutil.which("git")
pytestmark = pytest.mark.skipif(GIT is None, reason="needs git")


def _ignored(root: Path, *paths: str) -> list[str]:
    out = subprocess.run(
        [str(GIT), "-C", str(root), "check-ignore", "--no-index", *paths],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return out.stdout.split()


@pytest.mark.skipif(git_work_tree(ROOT) is None, reason="the checkout is not a git work tree")
def test_provisioning_output_and_run_folders_are_ignored() -> None:
    secrets = [
        "bundles/clients/client-1/he-secret.ctx",
        "bundles/clients/client-1/node.key",
        "bundles/server/operator.key",
        "bundles/ca-private/ca.key",
        "runs/latest/keys/clients.secret",
        "fl/clients/client-2/he-secret.ctx",
        "deploy/server/server.key",
    ]
    assert _ignored(ROOT, *secrets) == secrets


def _provision(out: Path) -> str:
    argv = ["provision", "--out", str(out), "--clients", "1", "--server-host", "127.0.0.1"]
    assert sepals_main([*argv, "--scheme", "none", "--model-parameters", "11"]) == 0
    return str(out)


def test_provision_warns_when_it_writes_secrets_inside_a_git_work_tree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    subprocess.run([str(GIT), "init", "-q", str(repo)], check=True, timeout=30)
    _provision(repo / "keys")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "warning" in err[0] and str(repo) in err[0] and "NOT ignore" in err[0]
    (repo / ".gitignore").write_text("bundles/\n")
    _provision(repo / "bundles")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "git ignores it" in err[0], err
    # Outside any work tree: nothing to warn about.
    outside = tmp_path / "elsewhere"
    if subprocess.run([str(GIT), "-C", str(tmp_path), "rev-parse"], capture_output=True).returncode:
        _provision(outside)
        assert capsys.readouterr().err.strip() == ""
