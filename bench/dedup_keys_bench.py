"""What prepare's de-duplication would cost the JVM if only row keys crossed into it.

A measurement for a design not built (issue 18, prepare >= 1.5x a single process): the parsing
tasks would write their featurized rows themselves and hand Spark only each row's key, so the
one shuffle moves ~40 B a row instead of the text, raw record and hashes (~600 B). Here Python
tasks make ``--rows`` such keys (64-bit content hash with ~2% duplicates, label, origin, file,
row number, task, index) and pass them to the JVM as Arrow; the JVM runs prepare's own
``resolve_duplicates`` (shuffle, sort, window) on them; the decisions go back to Python as
Arrow. CPU seconds by process (``/proc``) of one run after an untimed warm-up, per row.

    .venv/bin/python bench/dedup_keys_bench.py [--rows 8000000]

Compare ``jvm_us_per_row`` with prepare_bench's JVM CPU per row (the whole rows' way).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
from common import cpu_delta, emit, machine, spark_cpu_seconds

from dl_pipeline.config import SparkConfig
from dl_pipeline.prepare import resolve_duplicates
from dl_pipeline.spark import get_spark

TASKS = 4
KEYS = ("origin string, source_file string, row_number long, label int, reason string, raw string, h long, "
        "task int, idx int")


def _keys(rows_per_task: int):
    """mapInArrow body: task numbers -> that task's keys (seeded, so every run sends the same)."""

    def run(batches):
        for batch in batches:
            for task in batch.column(0).to_pylist():
                rng = np.random.default_rng(task)
                n = rows_per_task
                h = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
                h[::50] = h[1::50][: len(h[::50])]  # every 50th row repeats its neighbour's content
                yield pa.RecordBatch.from_pydict({
                    "origin": pa.array(["train"] * n), "source_file": pa.array([f"file:///data/part_{task}.csv"] * n),
                    "row_number": pa.array(np.arange(1, n + 1, dtype=np.int64)),
                    "label": pa.array(rng.integers(0, 4, n, dtype=np.int32)),
                    "reason": pa.nulls(n, pa.string()), "raw": pa.nulls(n, pa.string()), "h": pa.array(h),
                    "task": pa.array(np.full(n, task, np.int32)), "idx": pa.array(np.arange(n, dtype=np.int32))})

    return run


def _count(batches):
    yield pa.RecordBatch.from_pydict({"n": pa.array([sum(b.num_rows for b in batches)], pa.int64())})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8_000_000)
    args = ap.parse_args()
    spark = get_spark(SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "8", "spark.driver.memory": "2g"}))
    keys = _keys(args.rows // TASKS)

    def run() -> int:
        df = spark.range(TASKS, numPartitions=TASKS).mapInArrow(keys, KEYS)
        decided = df.transform(resolve_duplicates(32, 8, 42)).select("task", "idx", "reason", "_group")
        return sum(r["n"] for r in decided.coalesce(2).mapInArrow(_count, "n long").collect())

    run()  # warm-up: class loading, code generation
    c0, t0 = spark_cpu_seconds(), time.perf_counter()
    n = run()
    wall = time.perf_counter() - t0
    cpu = cpu_delta(c0, spark_cpu_seconds())
    spark.stop()
    emit({"bench": "dedup_keys", "machine": machine(), "spark_master": "local[2]", "rows": n, "wall_s": round(wall, 2),
          "cpu_s": cpu, "jvm_us_per_row": round((cpu["jvm"] + cpu["jvm_jit_compiler"]) / n * 1e6, 2),
          "python_us_per_row": round(cpu["python_workers"] / n * 1e6, 2)})


if __name__ == "__main__":
    main()
