#!/usr/bin/env bash
# Idempotent environment set-up: .venv with the pinned stack, horovod from the local wheel cache.
# A second run on the same machine finishes in well under a minute (nothing to build).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
stamp="$VENV/.setup-stamp"
want=$(cat requirements/base.txt requirements/dev.txt requirements/lock.txt setup.py scripts/setup.sh scripts/build_horovod.sh | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import horovod.torch, petastorm, pyspark" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

command -v "$PYTHON" >/dev/null || { echo "setup: $PYTHON not found; set PYTHON=/path/to/python3.11" >&2; exit 2; }
command -v java >/dev/null || { echo "setup: java not found; Spark 3.5 needs Java 17 (apt-get install openjdk-17-jre-headless)" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip 'setuptools<70' wheel
# torch first: horovod compiles against it. The lock pins every transitive version.
"${PIP[@]}" install -q -c requirements/lock.txt -r requirements/base.txt -r requirements/dev.txt
bash scripts/build_horovod.sh "$VENV/bin/python"
CACHE=${DL_PIPELINE_WHEEL_CACHE:-$HOME/.cache/dl_pipeline/wheels}
"${PIP[@]}" install -q --no-deps --force-reinstall "$CACHE"/horovod-0.28.1-*.whl
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" - <<'PY'
import horovod.torch as hvd, petastorm, pyarrow, pyspark, torch
print(f"setup: torch {torch.__version__}, horovod {hvd.__version__ if hasattr(hvd,'__version__') else 'ok'} "
      f"(gloo={hvd.gloo_built()}, nccl={hvd.nccl_built()}), pyspark {pyspark.__version__}, "
      f"pyarrow {pyarrow.__version__}, petastorm {petastorm.__version__}")
PY
echo "$want" > "$stamp"
