#!/usr/bin/env bash
# The end-to-end demo on the bundled sample (data/sample): prepare -> train (2 Horovod ranks
# inside local Spark) -> score, then a report. Everything stays under runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
export SPARK_LOCAL_IP=127.0.0.1
DLP=.venv/bin/dl-pipeline
CONF=conf/demo.yaml
RUN_DATE=${RUN_DATE:-$(date -u +%F)}

echo "== 1/3 prepare: clean, featurize and shard the AG News sample into Petastorm"
$DLP prepare --config "$CONF" --quiet
echo "== 2/3 train: fastText on 2 Horovod ranks (horovod.spark.run, Gloo)"
$DLP train --config "$CONF" --quiet
echo "== 3/3 score: batch-score the AG News test file for run date $RUN_DATE"
$DLP score --config "$CONF" --run-date "$RUN_DATE" --quiet
echo "== report"
$DLP report --config "$CONF" --quiet
echo "demo outputs: runs/demo/{prepared,train,scores}; plots: runs/demo/train/*.png"
