#!/usr/bin/env bash
# Build what a cluster needs:
#   dist/dl_pipeline-<v>-py3-none-any.whl   the package (Databricks libraries, pip install)
#   dist/dl_pipeline.zip                    for spark-submit --py-files
#   dist/env.tar.gz  (PACK_ENV=1)           a relocatable venv (venv-pack) for --archives env.tar.gz#env
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
rm -rf dist build/dist-env
mkdir -p dist
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w dist .
"$PY" - <<'PY'
import os, zipfile
with zipfile.ZipFile("dist/dl_pipeline.zip", "w", zipfile.ZIP_DEFLATED) as z:
    for root, _, files in os.walk("dl_pipeline"):
        for f in sorted(files):
            if f.endswith(".py"):
                z.write(os.path.join(root, f))
PY
if [ "${PACK_ENV:-0}" = 1 ]; then
  # venv-pack needs a venv without editable installs: build a clean one from the lock file.
  CACHE=${DL_PIPELINE_WHEEL_CACHE:-$HOME/.cache/dl_pipeline/wheels}
  "$PY" -m venv build/dist-env
  build/dist-env/bin/python -m pip install -q -c requirements/lock.txt -r requirements/base.txt
  build/dist-env/bin/python -m pip install -q --no-deps "$CACHE"/horovod-0.28.1-*.whl dist/dl_pipeline-*.whl venv-pack
  build/dist-env/bin/venv-pack -q -p build/dist-env -o dist/env.tar.gz
fi
ls -la dist
