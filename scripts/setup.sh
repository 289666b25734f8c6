#!/usr/bin/env bash
# Idempotent environment set-up. STACK=default (.venv: Spark 3.5, Horovod from the local wheel
# cache, Petastorm; ≈ Databricks 15.4 LTS ML) or STACK=spark4 (.venv-spark4: Spark 4.0, Arrow 19,
# numpy 2, no Horovod, no Petastorm; ≈ Databricks 17.3 LTS ML). A second run on the same machine
# finishes in well under a minute (nothing to build).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
STACK=${STACK:-default}
case "$STACK" in
  default) VENV=${VENV:-.venv}; reqs=(requirements/base.txt requirements/dev.txt); lock=requirements/lock.txt
           probe="import horovod.torch, petastorm, pyspark" ;;
  spark4)  VENV=${VENV_SPARK4:-.venv-spark4}; reqs=(requirements/spark4.txt requirements/dev.txt); lock=requirements/lock-spark4.txt
           probe="import pyspark, torch; assert pyspark.__version__.startswith('4.')" ;;
  *) echo "setup: STACK=$STACK: use default or spark4" >&2; exit 2 ;;
esac
stamp="$VENV/.setup-stamp"
want=$(cat "${reqs[@]}" "$lock" setup.py scripts/setup.sh scripts/build_horovod.sh | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "$probe" 2>/dev/null; then
  echo "setup: $VENV ($STACK stack) is up to date"
  exit 0
fi

# Each step prints one line; its pip/compiler output goes to $LOG, shown only when the step fails.
LOG=$(mktemp "${TMPDIR:-/tmp}/dl_pipeline-setup-$STACK.XXXXXX")
step() {
  local what=$1 t0=$SECONDS rc=0
  shift
  "$@" >>"$LOG" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "setup: $what FAILED (exit $rc); the last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    exit "$rc"
  fi
  echo "setup: $what ($((SECONDS - t0)) s)"
}

# Headless Chromium renders report.html in the report test (a system package, best effort:
# without it that one test is skipped, and says so).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && command -v apt-get >/dev/null \
   && [ "$(id -u)" = 0 ]; then
  clog=$(mktemp "${TMPDIR:-/tmp}/dl_pipeline-setup-chromium.XXXXXX")
  if { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
       || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }; } >"$clog" 2>&1; then
    echo "setup: chromium (system package, for the report test)"
    rm -f "$clog"
  else
    echo "setup: chromium could not be installed (apt-get; see $clog): the report's browser test will be skipped"
  fi
fi

command -v "$PYTHON" >/dev/null || { echo "setup: $PYTHON not found; set PYTHON=/path/to/python3.11" >&2; exit 2; }
command -v java >/dev/null || { echo "setup: java not found; Spark needs Java 17 (apt-get install openjdk-17-jre-headless)" >&2; exit 2; }
[ -x "$VENV/bin/python" ] || step "create $VENV" "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
step "pip, setuptools, wheel" "${PIP[@]}" install -q --upgrade pip 'setuptools<70' wheel
# The lock pins every transitive version.
req_args=(); for r in "${reqs[@]}"; do req_args+=(-r "$r"); done
step "requirements (${reqs[*]}, pinned by $lock)" "${PIP[@]}" install -q -c "$lock" "${req_args[@]}"
if [ "$STACK" = default ]; then
  # horovod compiles against the torch installed above
  step "horovod 0.28.1 wheel (built once, then cached)" bash scripts/build_horovod.sh "$VENV/bin/python"
  CACHE=${DL_PIPELINE_WHEEL_CACHE:-$HOME/.cache/dl_pipeline/wheels}
  step "horovod install" "${PIP[@]}" install -q --no-deps --force-reinstall "$CACHE"/horovod-0.28.1-*.whl
fi
# install_requires is the default stack's list; each stack's own pins are installed above.
step "dl_pipeline (editable)" "${PIP[@]}" install -q --no-deps --no-build-isolation -e .
if [ "$STACK" = default ]; then
  "$VENV/bin/python" - <<'PY'
import horovod.torch as hvd, petastorm, pyarrow, pyspark, torch
print(f"setup: torch {torch.__version__}, horovod {hvd.__version__ if hasattr(hvd,'__version__') else 'ok'} "
      f"(gloo={hvd.gloo_built()}, nccl={hvd.nccl_built()}), pyspark {pyspark.__version__}, "
      f"pyarrow {pyarrow.__version__}, petastorm {petastorm.__version__}")
PY
else
  "$VENV/bin/python" - <<'PY'
import importlib.util, numpy, pandas, pyarrow, pyspark, torch
assert importlib.util.find_spec("horovod") is None and importlib.util.find_spec("petastorm") is None
print(f"setup: spark4 stack: torch {torch.__version__}, pyspark {pyspark.__version__}, pyarrow {pyarrow.__version__}, "
      f"numpy {numpy.__version__}, pandas {pandas.__version__} (no horovod, no petastorm)")
PY
fi
echo "$want" > "$stamp"
rm -f "$LOG"
