"""Docs that run: every Python and shell block of the README and docs/ runs as written.

Each ```python block is written to a file and run as ``python FILE``; each ```bash (or
```sh) block runs with ``bash -e``. Both run from the repository root, as the docs say
(after ``./scripts/bootstrap.sh``), with this interpreter's ``bin`` first on ``PATH``.
The environment is a fresh user's: ``HOME`` is a new folder for each page (so ``~/fl``
and Flower's ``~/.flwr`` are private to the test), and Flower's local SuperLink gets
free ports. Nothing in a block is rewritten: its rounds and clients are the docs' own.
A block whose text appears on several pages runs once.

A block that cannot run here says so in the Markdown, on the line just above its fence::

    <!-- docs-test: skip (needs a deployment) -->

with the reason in parentheses; pytest reports it as skipped with that reason
(``-ra``). docs/development.md describes the convention.

Some blocks carry claims of their own, checked on their output: the README's
``simulate()`` snippet runs from a plain script and prints sepals' round lines, each
Flower line at most once and no deprecation notice; ``flwr run .`` runs offline, shows
the model's accuracy, and leaves nothing running but Flower's own local SuperLink.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES: list[Path] = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)\s*$")
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->$")
MARKER = re.compile(r"^<!--.*docs-test")  # at the line's start: an indented one is an example
LANGUAGES = {"python": "python", "bash": "bash", "sh": "bash"}
TIMEOUT = {"python": 300, "bash": 600}


@dataclass
class Block:
    """A code block of the docs, with every place its text appears."""

    language: str
    text: str
    places: list[str] = field(default_factory=list)
    skips: list[str | None] = field(default_factory=list)

    @property
    def page(self) -> str:
        return self.places[0].split(":")[0]


def blocks_of(page: Path) -> Iterator[tuple[int, str, str, str | None]]:
    """``(line, language, text, skip reason)`` of every Python and shell block of a page."""
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i].strip())
        if not match:
            i += 1
            continue
        marker, language = match.group(1), match.group(2).lower()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(marker):
            end += 1
        if language in LANGUAGES:
            above = lines[i - 1].strip() if i > 0 else ""
            skip = SKIP.match(above)
            yield (
                i + 1,
                LANGUAGES[language],
                "\n".join(lines[i + 1 : end]) + "\n",
                (skip.group("reason").strip() if skip else None),
            )
        i = end + 1


def collect() -> list[Block]:
    found: dict[tuple[str, str], Block] = {}
    for page in PAGES:
        for line, language, text, skip in blocks_of(page):
            block = found.setdefault((language, text.strip()), Block(language, text))
            block.places.append(f"{page.relative_to(ROOT)}:{line}")
            block.skips.append(skip)
    return list(found.values())


BLOCKS = collect()


# ------------------------------------------------------------------------- environment
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line or environment mentions ``text`` (a private HOME)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline or f"HOME={text}".encode() in environ:
            pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _stop_all(home: str) -> None:
    """End whatever a block left running under its private HOME (SIGTERM, then SIGKILL)."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        for pid in _pids_mentioning(home):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _pids_mentioning(home) and time.monotonic() < deadline:
            time.sleep(0.3)


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    made: dict[str, Path] = {}
    yield made
    for home in made.values():
        _stop_all(str(home))


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "VIRTUAL_ENV")}
    bindir = str(Path(sys.executable).parent)
    env.update(
        HOME=str(home),
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
        # A private local SuperLink for `flwr run`: its own ports, so no one else's is used.
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
    )
    return env


# ---------------------------------------------------------------- what blocks also claim
Check = Callable[[str, str, Path], None]


def _check_simulate_script(text: str, out: str, home: Path) -> None:
    """The README's simulate() snippet, as a script: sepals' lines, Flower's once, no notice.

    And what it claims: the model learned within the budget, and the saved model, rebuilt
    with ``sepals.load_model``, scores what the report says.
    """
    assert re.search(r"^starting: \d+ clients", out, re.M), out[-3000:]
    assert re.search(r"^started in [\d.]+ s \| round 0", out, re.M), out[-3000:]
    assert re.search(r"^round +1/\d+ \| ", out, re.M), out[-3000:]
    assert re.search(r"^final ", out, re.M), out[-3000:]
    assert "DEPRECATED FEATURE" not in out, out[-3000:]
    # Opacus' logging.basicConfig handler prints records as "12/07/2026 22:55:38:INFO:...".
    assert not re.search(r"^\d\d/\d\d/\d{4} [\d:]+:(DEBUG|INFO|WARNING):", out, re.M), out[-3000:]
    assert "BrokenProcessPool" not in out and "bootstrapping phase" not in out
    folder = re.search(r'out="([^"]+)"', text)
    assert folder, "the snippet names its output folder"
    report = json.loads((ROOT / folder.group(1) / "report.json").read_text())
    first, last = report["initial"]["metric"], report["final"]["metric"]
    assert out.strip().splitlines()[-1] == f"{first} -> {last}", out[-3000:]
    assert report["config"]["metric"] == {"name": "r2", "higher_is_better": True}
    assert report["config"]["codec"].startswith("bfv")
    assert last > first + 0.1, (first, last)
    assert 0 < report["final"]["epsilon"] <= 8.0
    assert all(c["epsilon"] <= 8.0 for c in report["clients"])
    _check_saved_model(ROOT / folder.group(1) / report["final"]["model"], last)


def _check_saved_model(path: Path, metric: float) -> None:
    """The saved model is the final global model: rebuilt, it scores the reported metric."""
    import torch

    import sepals

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import regression_app  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    model = sepals.load_model(path, regression_app.make_model)
    _, test = regression_app.diabetes(0)
    with torch.no_grad():
        r2 = regression_app.r2_score(model(test.tensors[0]), test.tensors[1])
    assert r2 == pytest.approx(metric, abs=1e-4)


def _installed() -> list[tuple[str, str]]:
    import importlib.metadata

    return sorted((str(d.metadata["Name"]), d.version) for d in importlib.metadata.distributions())


def _check_flwr_run(text: str, out: str, home: Path) -> None:
    """`flwr run .`: offline, the model's accuracy shown, nothing left but the SuperLink."""
    assert "Successfully started run" in out, out[-4000:]
    assert "Installing application dependencies" not in out, out[-4000:]
    line = next((ln for ln in out.splitlines() if "rounds aggregated" in ln), "")
    assert re.search(r"(\d+) of \1 rounds aggregated", line), out[-4000:]
    eps = float(line.split("epsilon ")[1].split()[0])
    assert 0.0 < eps <= 8.0, line
    # Central evaluation, as sepals-sim's: the model's score on the held-out split.
    central = re.search(r"\| (\S+) +(-?[\d.]+)%? central \(round 0: ", line)
    assert central, line
    if central.group(1) == "acc":  # the default job: digits, far above chance
        assert float(central.group(2)) > 20.0, line
    flwr_home = home / ".flwr"
    assert not list(flwr_home.glob("runtime-envs/*"))
    assert not list(flwr_home.glob("sepals-runs/*/keys/clients.secret"))
    # Flower 1.41 leaves its local SuperLink (and SuperExec) running, detached; the run
    # itself (simulation process, Ray, the evaluator) leaves nothing behind.
    deadline = time.monotonic() + 30
    others = ["?"]
    while others and time.monotonic() < deadline:
        left = {pid: _cmdline(pid) for pid in _pids_mentioning(str(home))}
        others = [c for c in left.values() if not re.search(r"flower-super(link|exec)", c)]
        time.sleep(0.5)
    assert not others, others


CHECKS: dict[str, Check] = {
    "from sepals import simulate": _check_simulate_script,
    "flwr run . --stream": _check_flwr_run,
}


# ---------------------------------------------------------------------------------- tests
def test_the_docs_have_blocks_and_markers_are_well_formed() -> None:
    """Every marker parses and sits right above a block; a repeated block agrees with itself."""
    assert len(BLOCKS) > 15
    runnable = [b for b in BLOCKS if b.skips[0] is None]
    assert any(b.language == "python" for b in runnable)
    assert any(b.language == "bash" for b in runnable)
    bad = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not MARKER.match(line):
                continue
            below = lines[number].strip() if number < len(lines) else ""
            if not SKIP.match(line.strip()) or not FENCE.match(below):
                bad.append(f"{page.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bad, "malformed docs-test markers:\n" + "\n".join(bad)
    for block in BLOCKS:
        assert len(set(block.skips)) == 1, f"marked differently at {block.places}"
    for key in CHECKS:
        assert any(key in b.text and b.skips[0] is None for b in BLOCKS), key


def test_every_flwr_run_block_stays_offline() -> None:
    """`flwr run` installs an app's dependencies unless told not to: every block says so."""
    missing = [
        ", ".join(b.places)
        for b in BLOCKS
        if b.language == "bash"
        and "flwr run" in b.text
        and "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" not in b.text
    ]
    assert not missing, f"flwr run without the offline exports at {missing}"


def test_the_docs_name_the_flower_components_that_run() -> None:
    """`flwr run .` loads the components pyproject.toml names: the docs name those."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        components = tomllib.load(f)["tool"]["flwr"]["app"]["components"]
    page = (ROOT / "docs" / "simulation.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(sepals\.[\w.]+:\w+)`", page))
    for ref in components.values():
        assert f"`{ref}`" in page, f"docs/simulation.md does not name {ref}"
    stale = {
        ref
        for ref in named
        if ref.split(":")[1] in ("app", "server_app", "client_app")
        and ref not in components.values()
    }
    assert not stale, f"docs/simulation.md names components that do not run: {stale}"


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.places[0] for b in BLOCKS])
def test_block_runs(block: Block, homes: dict[str, Path], tmp_path: Path) -> None:
    if block.skips[0] is not None:
        pytest.skip(block.skips[0])
    home = homes.setdefault(block.page, tmp_path / "home")
    home.mkdir(exist_ok=True)
    if block.language == "python":
        script = tmp_path / "snippet.py"
        script.write_text(block.text)
        argv = [sys.executable, str(script)]
    else:
        script = tmp_path / "snippet.sh"
        script.write_text(block.text)
        argv = ["bash", "-e", str(script)]
    flwr_run = "flwr run" in block.text
    before = _installed() if flwr_run else []
    proc = subprocess.run(
        argv,
        cwd=ROOT,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=TIMEOUT[block.language],
        stdin=subprocess.DEVNULL,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{', '.join(block.places)} failed:\n{out[-4000:]}"
    if flwr_run:
        assert _installed() == before, "flwr run installed or changed packages"
    for key, check in CHECKS.items():
        if key in block.text:
            check(block.text, out, home)
