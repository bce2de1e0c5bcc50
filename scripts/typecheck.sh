#!/usr/bin/env bash
# Type-check sepals as its users import it: `sepals.common` etc., not `common`.
#
# The packages live in top-level folders mapped by setuptools' package-dir, which an
# editable install resolves through an import hook that mypy cannot follow. This script
# links them into build/typecheck/sepals (pyproject.toml's mypy_path), so every
# `from sepals... import` is checked against the real module. Arguments go to mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck/sepals
mkdir -p "$tree"
for file in sepals/*.py; do
  ln -sfn "../../../$file" "$tree/$(basename "$file")"
done
for part in common client server simulations; do
  ln -sfn "../../../$part" "$tree/$part"
done
exec .venv/bin/mypy "$@"
