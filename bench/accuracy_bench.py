"""Accuracy report on real data, CPU only: the targets of the train stage.

  * AG News data/sample train (10,429 rows) -> its full test file (7,600): >= 85.0%
  * DBpedia sample_a -> sample_b: >= 93%
  * Fashion-MNIST subset (4,443 images), 80/20 split: >= 85%

Each dataset goes through the real pipeline (prepare -> train with 2 Horovod ranks in local
Spark) using its conf/*.yaml, with paths pointed at the bundled sample.

    .venv/bin/python bench/accuracy_bench.py [--only ag_news,dbpedia,fashion_mnist]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from common import ROOT, emit, machine

from dl_pipeline.config import SparkConfig, load_config
from dl_pipeline.prepare import prepare_dataset
from dl_pipeline.spark import get_spark
from dl_pipeline.train.driver import train_model

S = os.path.join(ROOT, "data", "sample")
CASES = {
    "ag_news": ("ag_news.yaml", 0.85, [f"data.train_path={S}/ag_news/train.csv.gz", f"data.test_path={S}/ag_news/test.csv.gz"]),
    "dbpedia": ("dbpedia.yaml", 0.93, [f"data.train_path={S}/dbpedia/sample_a.csv.gz", f"data.test_path={S}/dbpedia/sample_b.csv.gz"]),
    "fashion_mnist": ("fashion_mnist.yaml", 0.85, [f"data.train_path={S}/fashion_mnist/t10k-images-idx3-ubyte.gz",
                                                   f"data.train_labels_path={S}/fashion_mnist/t10k-labels-idx1-ubyte.gz"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dlp-accuracy"))
    args = ap.parse_args()
    spark = get_spark(SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "4"}))
    results = {}
    for name in args.only.split(","):
        conf, target, paths = CASES[name]
        work = os.path.join(args.workdir, name)
        shutil.rmtree(work, ignore_errors=True)
        cfg = load_config(os.path.join(ROOT, "conf", conf), [
            *paths, f"prepare.output_path={work}/prepared", f"train.data_path={work}/prepared",
            f"train.run_dir={work}/run", f"train.num_proc={args.num_proc}", "train.progress=false",
        ])
        t0 = time.perf_counter()
        manifest = prepare_dataset(spark, cfg)
        t1 = time.perf_counter()
        metrics = train_model(cfg, spark=spark)
        t2 = time.perf_counter()
        results[name] = {
            "test_accuracy": round(metrics["test"]["accuracy"], 4),
            "target": target,
            "meets_target": metrics["test"]["accuracy"] >= target,
            "test_rows": metrics["test"]["rows"],
            "train_rows": manifest["splits"]["train"]["rows"],
            "val_accuracy": round(metrics["val"]["accuracy"], 4),
            "epochs_run": metrics["epochs_run"],
            "model": cfg.model.name,
            "prepare_s": round(t1 - t0, 1),
            "train_s": round(t2 - t1, 1),
            "world_size": metrics["world_size"],
        }
    emit({"benchmark": "accuracy", "machine": machine(), "launcher": "spark (horovod.spark.run, Gloo, CPU)", "results": results})


if __name__ == "__main__":
    main()
