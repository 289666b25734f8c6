#!/usr/bin/env bash
# `make test`: the whole suite on the default stack (Spark 3.5, Horovod, Petastorm), then the
# whole suite again on the Spark 4 stack (.venv-spark4: TorchDistributor, the pyarrow reader;
# tests that need Horovod or Petastorm skip there). Each part's wall time is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
export SPARK_LOCAL_IP=${SPARK_LOCAL_IP:-127.0.0.1} PYTHONHASHSEED=${PYTHONHASHSEED:-0}

part() {  # part NAME CMD...: run CMD, print its wall time
  local name=$1 t0=$SECONDS
  shift
  "$@"
  echo "make test: $name took $((SECONDS - t0)) s"
}

default=$PWD/${VENV:-.venv}/bin/python spark4=$PWD/${VENV_SPARK4:-.venv-spark4}/bin/python
part "the default stack's suite" env PYSPARK_PYTHON="$default" PYSPARK_DRIVER_PYTHON="$default" "$default" -m pytest -q -ra "$@"
part "the spark4 stack's set-up" env STACK=spark4 bash scripts/setup.sh
part "the spark4 stack's suite" env PYSPARK_PYTHON="$spark4" PYSPARK_DRIVER_PYTHON="$spark4" "$spark4" -m pytest -q -ra "$@"
