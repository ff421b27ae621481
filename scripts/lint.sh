#!/usr/bin/env bash
# Static gates, run by .ci/run before the tests (and by hand: PATH=.venv/bin:$PATH bash
# scripts/lint.sh): ruff lint, ruff format check, mypy over the installed namespace, and the
# layering contracts of pyproject.toml ([tool.importlinter]) with lint-imports.
set -euo pipefail
cd "$(dirname "$0")/.."

ruff check --quiet .
ruff format --check --quiet .

# mypy maps files to module names by their folders; the repository's flat folders become
# refcache.actors/storage/metrics only when installed. A link tree under build/ gives mypy
# the installed names without installing (relative imports then resolve as they do at run time).
tree=build/typecheck/refcache
rm -rf build/typecheck
mkdir -p "$tree"
for d in actors storage metrics; do ln -s "../../../$d" "$tree/$d"; done
for f in refcache/*; do ln -s "../../../$f" "$tree/"; done
(cd build/typecheck && mypy --config-file ../../pyproject.toml -p refcache)

# lint-imports (grimp) finds a package by walking the directory of its top-level package:
# the editable install's refcache/ holds only the front door, so it walks the same link tree
# (the installed layout), which comes first on the path from its directory.
(cd build/typecheck && PYTHONPATH=. lint-imports --no-logo --no-cache ../../pyproject.toml)
