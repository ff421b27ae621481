#!/usr/bin/env bash
# Static gates, run by .ci/run before the tests (and by hand: PATH=.venv/bin:$PATH bash
# scripts/lint.sh): ruff lint, ruff format check, mypy over the installed namespace.
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
