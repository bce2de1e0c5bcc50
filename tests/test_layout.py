"""The package layout: one-way imports, no cycles, small modules, and one public import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import sepals

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "common": "sepals.common",
    "client": "sepals.client",
    "server": "sepals.server",
    "simulations": "sepals.simulations",
    "sepals": "sepals",
}
# What each part may import from sepals (its own part included): common <- client/server
# <- simulations <- the top-level package.
ALLOWED = {
    "common": {"common"},
    "client": {"client", "common"},
    "server": {"server", "common"},
    "simulations": {"simulations", "client", "server", "common"},
    "sepals": {"sepals", "simulations", "client", "server", "common"},
}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = tuple(p for p in parts if p != "__init__")
            out[".".join((package, *parts))] = path
    return out


MODULES = _modules()


def _part(module: str) -> str:
    rest = module.split(".")
    return rest[1] if len(rest) > 1 and rest[1] in ALLOWED else "sepals"


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Sepals modules ``path`` imports (``TYPE_CHECKING`` blocks left out)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
        if top_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            skip |= {id(n) for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n for n in names if n in MODULES}
    return found


def test_the_layout_is_found() -> None:
    assert "sepals.common.codec" in MODULES and "sepals.server.front" in MODULES
    assert len(MODULES) > 60


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module: str) -> None:
    part = _part(module)
    wrong = sorted(
        target
        for target in _imports(MODULES[module], top_level_only=False)
        if _part(target) not in ALLOWED[part]
    )
    assert not wrong, f"{module} ({part}) imports {wrong}"


def test_no_import_cycles() -> None:
    graph = {m: _imports(p, top_level_only=True) - {m} for m, p in MODULES.items()}
    # A package's __init__ importing its own submodules is how packages are built, not
    # a cycle between jobs.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it along its jobs"


def test_one_import_gives_the_public_api() -> None:
    assert sorted(sepals.__all__) == sorted(dir(sepals))
    for name in sepals.__all__:
        obj = getattr(sepals, name)
        assert getattr(obj, "__name__", name) == name
    assert issubclass(sepals.PlanViolationError, sepals.SepalsError)
    assert issubclass(sepals.ServerUnreachableError, sepals.SepalsError)
    with pytest.raises(AttributeError):
        _ = sepals.build_strategy  # type: ignore[attr-defined]


def test_the_server_zones_import_apart() -> None:
    """The public front and the ServerApp do not load the client SDK or the simulator."""
    code = (
        "import sys, sepals.server.front, sepals.server.serverapp.deployed_app\n"
        "loaded = [m for m in sys.modules if m.startswith(('sepals.client', "
        "'sepals.simulations'))]\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == ""


# The server's trust zones: the operator's control plane starts the public front and the
# ServerApp and may use both; neither of them may reach into the control plane (the
# ServerApp reads the run spec the control plane wrote, never server.toml).
ZONES = {
    "sepals.server.serverapp": {"sepals.server.control", "sepals.server.front"},
    "sepals.server.front": {"sepals.server.control", "sepals.server.serverapp"},
}


@pytest.mark.parametrize("zone", sorted(ZONES))
def test_the_server_trust_zones_import_one_way(zone: str) -> None:
    members = [m for m in MODULES if m == zone or m.startswith(zone + ".")]
    assert members
    wrong = sorted(
        f"{module} -> {target}"
        for module in members
        for target in _imports(MODULES[module], top_level_only=False)
        if any(target == z or target.startswith(z + ".") for z in ZONES[zone])
    )
    assert not wrong, f"{zone} reaches into another zone: {wrong}"


# An import inside a function needs a reason. These packages are slow to load or
# optional, and only some paths use them, so loading them where they are used is the
# reason: a process that never encrypts never loads SEAL, ``sepals-sim --help`` never
# loads Ray. Any other import inside a function says why in a comment on the line above
# its group of imports, or on the import itself.
LAZY_PACKAGES = {
    "captum",
    "cloudpickle",
    "datasets",
    "dp_accounting",
    "flwr_datasets",
    "galois",
    "matplotlib",
    "mlxtend",
    "opacus",
    "peft",
    "randomgen",
    "ray",
    "safetensors",
    "sklearn",
    "tenseal",
    "uvicorn",
}


def _import_line(line: str) -> bool:
    return line.strip().startswith(("import ", "from ", ")"))


def _unexplained_imports(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    bad: list[str] = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            if (name or "").split(".")[0] in LAZY_PACKAGES:
                continue
            # The group: the import lines above it, across the blank line that
            # separates third-party imports from sepals' own.
            first = node.lineno - 1
            while first > 0 and (
                _import_line(lines[first - 1])
                or (not lines[first - 1].strip() and first > 1 and _import_line(lines[first - 2]))
            ):
                first -= 1
            above = lines[first - 1].strip() if first > 0 else ""
            group = lines[first : node.end_lineno]
            if not above.startswith("#") and not any("#" in line for line in group):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return bad


def test_imports_inside_functions_have_a_reason() -> None:
    bad = [entry for path in sorted(set(MODULES.values())) for entry in _unexplained_imports(path)]
    assert not bad, "imports inside functions without a reason:\n" + "\n".join(bad)
