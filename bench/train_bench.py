"""Benchmark train: samples/s for 1 rank vs 2 Horovod ranks vs Hogwild (2 workers) on the same
prepared AG News sample and model, the fraction of step time spent waiting for data, and the
wall time to reach the accuracy target vs the fastText reference on the same rows.

    .venv/bin/python bench/train_bench.py [--epochs 5] [--workdir /tmp/dlp-train-bench]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile
import time

from common import AG_TEST, AG_TRAIN, emit, machine

from dl_pipeline.config import SparkConfig, load_config, replace
from dl_pipeline.features import clean_record
from dl_pipeline.prepare import prepare_dataset
from dl_pipeline.sources import parse_zhang_line
from dl_pipeline.spark import get_spark
from dl_pipeline.train.driver import train_model


def _run(cfg, spark, name, **train):
    run_dir = os.path.join(cfg.train.run_dir, name)
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    m = train_model(replace(cfg, train={**train, "run_dir": run_dir}), spark=spark)
    wall = time.perf_counter() - t0
    epochs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"epoch"' in line]
    sps = [e["samples_per_s"] for e in epochs if "samples_per_s" in e]
    waits = [e["data_wait_fraction"] for e in epochs if "data_wait_fraction" in e]
    return {
        "wall_s": round(wall, 2),
        "samples_per_s": round(sum(sps) / len(sps)) if sps else None,
        "data_wait_fraction": round(sum(waits) / len(waits), 4) if waits else None,
        "test_accuracy": round(m["test"]["accuracy"], 4),
        "epochs_run": m["epochs_run"],
        "world_size": m["world_size"],
    }


def fasttext_reference(workdir: str) -> dict | None:
    try:
        import fasttext
    except ImportError:
        return None

    def to_ft(src, dst):
        with gzip.open(src, "rt", encoding="utf-8") as fh, open(dst, "w") as out:
            for line in fh:
                label, parts, reason = parse_zhang_line(line.rstrip("\n"), 3)
                if not reason:
                    out.write(f"__label__{label} {clean_record(parts, '. ').lower().replace(chr(10), ' ')}\n")

    tr, te = os.path.join(workdir, "ft_train.txt"), os.path.join(workdir, "ft_test.txt")
    to_ft(AG_TRAIN, tr)
    to_ft(AG_TEST, te)
    t0 = time.perf_counter()
    model = fasttext.train_supervised(tr, wordNgrams=2, dim=50, epoch=10, lr=0.5, thread=2, verbose=0)
    wall = time.perf_counter() - t0
    n, p, _ = model.test(te)
    return {"wall_s": round(wall, 2), "test_accuracy": round(p, 4), "rows": n,
            "settings": "wordNgrams=2 dim=50 epoch=10 lr=0.5 thread=2"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dlp-train-bench"))
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    spark = get_spark(SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "4"}))
    cfg = load_config(None, [
        f"data.train_path={AG_TRAIN}", f"data.test_path={AG_TEST}", "data.num_classes=4",
        f"prepare.output_path={args.workdir}/prepared", f"train.data_path={args.workdir}/prepared",
        f"train.run_dir={args.workdir}/runs", "shard.max_workers=4", f"train.epochs={args.epochs}",
        "train.progress=false", "train.early_stopping_patience=0",
    ])
    if not os.path.exists(f"{args.workdir}/prepared/manifest.json"):
        prepare_dataset(spark, cfg)
    # Same per-step global batch (64) for the sync runs; Hogwild: 2 workers x 64 lock-free.
    results = {
        "one_rank": _run(cfg, spark, "one", launcher="local", batch_size=64),
        "two_horovod_ranks": _run(cfg, spark, "two", launcher="spark", num_proc=2, batch_size=32),
        "hogwild_two_workers": _run(cfg, spark, "hogwild", launcher="local", mode="hogwild", batch_size=64),
    }
    one = results["one_rank"]["samples_per_s"]
    emit({
        "benchmark": "train",
        "data": "AG News sample: data/sample/ag_news train (10,429 rows) -> its full test file (7,600)",
        "model": "fasttext (hashed uni+bigrams, EmbeddingBag 2^17 x 32)",
        "machine": machine(),
        "epochs": args.epochs,
        "runs": results,
        "speedup_two_ranks_vs_one": round(results["two_horovod_ranks"]["samples_per_s"] / one, 2) if one else None,
        "speedup_hogwild_vs_one": round(results["hogwild_two_workers"]["samples_per_s"] / one, 2) if one else None,
        "fasttext_reference": fasttext_reference(args.workdir),
    })


if __name__ == "__main__":
    main()
