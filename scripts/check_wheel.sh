#!/usr/bin/env bash
# Builds the wheel, installs it into a fresh venv and imports it from a directory that holds
# a metrics.py and a storage.py of its own (a user's modules must not shadow ours). Checks
# that every module of the source folders is in the wheel and nothing generic is at its top.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip wheel -q --no-deps -w "$work/dist" . >/dev/null
wheel=$(ls "$work"/dist/refcache-*.whl)
python3 - "$wheel" <<'PY'
import pathlib, sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
assert tops == {"refcache"}, f"wheel top level is {sorted(tops)}, expected only refcache/"
want = {"refcache/py.typed", *(p.as_posix() for p in pathlib.Path("refcache").glob("*.py"))}
for pkg in ("actors", "storage", "metrics"):
    for p in pathlib.Path(pkg).rglob("*"):
        if p.is_file() and p.suffix in (".py", ".json") and "__pycache__" not in p.parts:
            want.add(f"refcache/{p.as_posix()}")
missing = sorted(want - names)
assert not missing, f"wheel lacks {missing}"
print(f"ci: wheel has {len(names)} files, top level refcache/ only")
PY
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$wheel"
mkdir "$work/user"
echo 'raise ImportError("the user metrics.py was imported instead of refcache.metrics")' > "$work/user/metrics.py"
echo 'raise ImportError("the user storage.py was imported instead of refcache.storage")' > "$work/user/storage.py"
cat > "$work/user/orchestrator.py" <<'PY'
import importlib.util, sys, tempfile
from refcache import open_cache
import refcache.metrics
for generic in ("actors", "storage", "metrics"):
    spec = importlib.util.find_spec(generic)
    if spec is not None and spec.origin and "site-packages" in spec.origin:
        sys.exit(f"{generic} is installed at the top level: {spec.origin}")
with tempfile.TemporaryDirectory() as root, open_cache(root, snapshotter="native", metrics_port=0) as cache:
    ref = cache.manager.new(description="wheel check").get(timeout=60).commit()
    assert ref.size() >= 0
    ref.release()
print("ci: the installed wheel works beside a user's metrics.py and storage.py")
PY
(cd "$work/user" && "$work/venv/bin/python" orchestrator.py)
# The console script is the front door's (refcache/__main__.py, which wires demo's metrics).
(cd "$work/user" && "$work/venv/bin/refcache" --version >/dev/null)
