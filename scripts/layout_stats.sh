#!/usr/bin/env bash
# The layout's figures at a commit: README length, package modules and their sizes, the
# modules over 500 lines, imports inside functions, and test files that import private
# names. Usage: bash scripts/layout_stats.sh [REV]   (default HEAD)
set -uo pipefail
rev=${1:-HEAD}
tmp=$(mktemp -d); git -C "$(dirname "$0")/.." archive "$rev" | tar -x -C "$tmp"
cd "$tmp"
echo "rev $rev"
echo "README lines: $(wc -l < README.md)"
files=$(find common client server simulations sepals -name '*.py' 2>/dev/null)
echo "package modules: $(echo "$files" | wc -l), lines: $(cat $files | wc -l)"
echo "modules over 500 lines: $(for f in $files; do n=$(wc -l < $f); [ $n -gt 500 ] && echo "$f:$n"; done | sort -t: -k2 -nr | tr '\n' ' ')"
python3 - <<'PY'
import ast, pathlib
n=0; priv=set()
for folder in ["common","client","server","simulations","sepals"]:
    for p in pathlib.Path(folder).rglob("*.py"):
        t=ast.parse(p.read_text())
        for fn in ast.walk(t):
            if isinstance(fn,(ast.FunctionDef,ast.AsyncFunctionDef)):
                n+=sum(isinstance(x,(ast.Import,ast.ImportFrom)) for x in ast.walk(fn))
for p in pathlib.Path("tests").glob("*.py"):
    t=ast.parse(p.read_text())
    for x in ast.walk(t):
        if isinstance(x,ast.ImportFrom) and x.module and x.module.startswith("sepals") and any(a.name.startswith("_") for a in x.names):
            priv.add(p.name)
print(f"imports inside functions: {n}")
print(f"test files importing private sepals names: {len(priv)}")
PY
rm -rf "$tmp"
