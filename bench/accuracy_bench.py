"""Accuracy of the untuned defaults on every text dataset we hold, against fastText on the same rows.

For each dataset: the real pipeline (prepare -> train, 2 Horovod ranks in local Spark) with its
``conf/*.yaml``, which holds only data facts (paths, fields, classes, names): no ``train.*`` or
``model.*`` key is set, so the model's recipe decides optimizer, LR schedule, batch size and
epochs (early stopping on the validation split). The peer is fastText 0.9.3 (``wordNgrams=2
dim=50 epoch=10 lr=0.5``, 2 threads) trained on exactly our training rows (our val rows left out)
and tested on our test rows. Target: ours >= fastText + 1 pt on every text dataset.

Both sides vary from run to run: ours with ``train.seed`` (initial weights, shuffling), fastText
with its threads' races. A single run of each lands up to ~1.5 pt apart on the 1,295 Amazon
test rows, so the figure compared is the mean of our runs over ``--seeds`` (default 42,43,44)
against the mean of ``--peer-runs`` fastText runs (default 3); every run's accuracy is listed.

    .venv/bin/python bench/accuracy_bench.py [--only ag_news,dbpedia] [--models fasttext,lstm] [--seeds 42]

Rows (the shared samples, ../shared/data/README.md):
  * ag_news: train.csv.gz (10,429 rows) -> the full test file (7,600)
  * dbpedia: sample_a (5,000) -> sample_b (5,000)
  * yelp_polarity: train_head (200) -> the Yelp Review Full sample mapped to polarity (stars 1-2
    negative, 4-5 positive, 3 left out: 800 rows), since its own test_head has 20 rows
  * yelp_full: sample (1,000, 5 classes): 20% carved out as test (the config's shard.test_fraction)
  * amazon_polarity: test_head (6,459): 20% carved out as test
  * fashion_mnist (images, the cnn recipe; no fastText peer): 4,443 images, 20% test, target 85%
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from common import ROOT, SHARED, emit, fasttext_peer, machine, yelp_full_as_polarity

from dl_pipeline.config import SparkConfig, load_config
from dl_pipeline.dataset import read_manifest
from dl_pipeline.prepare import prepare_dataset
from dl_pipeline.spark import get_spark
from dl_pipeline.train.driver import train_model

TEXT = ("ag_news", "dbpedia", "yelp_polarity", "yelp_full", "amazon_polarity")
CONF = {"ag_news": "ag_news.yaml", "dbpedia": "dbpedia.yaml", "yelp_polarity": "yelp_polarity.yaml",
        "yelp_full": "yelp_full.yaml", "amazon_polarity": "amazon_polarity.yaml", "fashion_mnist": "fashion_mnist.yaml"}


def data_paths(name: str, workdir: str) -> list[str]:
    """The configs' paths, pointed at the shared samples from wherever this runs."""
    paths = {
        "ag_news": [f"data.train_path={SHARED}/ag_news/train.csv.gz", f"data.test_path={SHARED}/ag_news/test.csv.gz"],
        "dbpedia": [f"data.train_path={SHARED}/dbpedia/sample_a.csv.gz", f"data.test_path={SHARED}/dbpedia/sample_b.csv.gz"],
        "yelp_polarity": [f"data.train_path={SHARED}/yelp_review_polarity/train_head.csv.gz",
                          f"data.test_path={yelp_full_as_polarity(os.path.join(workdir, 'yelp_full_polarity.csv.gz'))}"],
        "yelp_full": [f"data.train_path={SHARED}/yelp_review_full/sample.csv.gz"],
        "amazon_polarity": [f"data.train_path={SHARED}/amazon_review_polarity/test_head.csv.gz"],
        "fashion_mnist": [f"data.train_path={SHARED}/fashion_mnist/t10k-images-idx3-ubyte.gz",
                          f"data.train_labels_path={SHARED}/fashion_mnist/t10k-labels-idx1-ubyte.gz"],
    }
    return paths[name]


def run_case(spark, name: str, model: str, workdir: str, num_proc: int, peer: bool, extra: tuple[str, ...] = (),
             run: str = "", seeds: tuple[int, ...] = (42,), peer_runs: int = 1) -> dict:
    """prepare (once per workdir) -> train with the defaults (+ ``extra``) once per seed -> (fastText
    peer, ``peer_runs`` times). Accuracies are the means over the seeds / the peer's runs."""
    work = os.path.join(workdir, name)
    prepared = f"{work}/prepared"
    runs, prepare_s = [], 0.0
    for seed in seeds:
        run_dir = f"{work}/run-{run or model}" + (f"-s{seed}" if len(seeds) > 1 else "")
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [*data_paths(name, workdir), f"prepare.output_path={prepared}", f"train.data_path={prepared}",
                     f"train.run_dir={run_dir}", f"train.num_proc={num_proc}", "train.progress=false", f"train.seed={seed}"]
        if model != "default":
            overrides.append(f"model.name={model}")
        overrides.extend(extra)
        cfg = load_config(os.path.join(ROOT, "conf", CONF[name]), overrides)
        t0 = time.perf_counter()
        if not os.path.exists(f"{prepared}/manifest.json"):
            prepare_dataset(spark, cfg)
            prepare_s = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        metrics = train_model(cfg, spark=spark)
        runs.append({"seed": seed, "test_accuracy": round(metrics["test"]["accuracy"], 4),
                     "val_accuracy": round(metrics["val"]["accuracy"], 4), "epochs_run": metrics["epochs_run"],
                     "samples_per_s": round(sum(e["samples_per_s"] for e in metrics["history"]) / len(metrics["history"])),
                     "train_wall_s": round(time.perf_counter() - t1, 1), "bundle": os.path.join(run_dir, "model"),
                     "test_rows": metrics["test"]["rows"], "world_size": metrics["world_size"]})
    out = {
        "model": cfg.model.name,
        "test_accuracy": round(sum(r["test_accuracy"] for r in runs) / len(runs), 4),
        "test_accuracies": [r["test_accuracy"] for r in runs],
        "val_accuracy": round(sum(r["val_accuracy"] for r in runs) / len(runs), 4),
        "train_rows": read_manifest(prepared)["splits"]["train"]["rows"],
        "test_rows": runs[0]["test_rows"],
        "seeds": list(seeds),
        "epochs_run": [r["epochs_run"] for r in runs],
        "samples_per_s": round(sum(r["samples_per_s"] for r in runs) / len(runs)),
        "prepare_s": prepare_s,
        "train_wall_s": [r["train_wall_s"] for r in runs],
        "world_size": runs[0]["world_size"],
        "bundle": runs[0]["bundle"],
    }
    if peer:
        ft = fasttext_peer(spark, cfg, work, 10, repeats=peer_runs)
        out["fasttext"] = {k: ft[k] for k in ("test_accuracy", "test_accuracies", "train_wall_s", "samples_per_s")}
        out["points_over_fasttext"] = round(100 * (out["test_accuracy"] - ft["test_accuracy"]), 2)
        out["meets_target"] = out["points_over_fasttext"] >= 1.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join((*TEXT, "fashion_mnist")))
    ap.add_argument("--models", default="default", help="comma list; 'default' = the config's model (fasttext)")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dlp-accuracy"))
    ap.add_argument("--seeds", default="42,43,44", help="our runs, one per train.seed; the accuracy is their mean")
    ap.add_argument("--peer-runs", type=int, default=3, help="fastText runs (they differ: threads race); their mean")
    args = ap.parse_args()
    seeds = tuple(int(x) for x in args.seeds.split(","))
    os.makedirs(args.workdir, exist_ok=True)
    spark = get_spark(SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "4"}))
    results = {}
    for name in args.only.split(","):
        for model in args.models.split(","):
            if name == "fashion_mnist" and model != "default":
                continue
            r = run_case(spark, name, model, args.workdir, args.num_proc, peer=name in TEXT, seeds=seeds,
                         peer_runs=args.peer_runs)
            if name == "fashion_mnist":
                r["target"], r["meets_target"] = 0.85, r["test_accuracy"] >= 0.85
            results[f"{name}/{r['model']}"] = r
    text = [r for r in results.values() if "points_over_fasttext" in r]
    emit({"benchmark": "accuracy", "machine": machine(), "launcher": f"spark (horovod.spark.run, {args.num_proc} ranks, Gloo, CPU)",
          "settings": "defaults: conf/*.yaml holds only data facts; no train.* or model.* key set (but model.name for --models)",
          "peer": "fasttext 0.9.3 wordNgrams=2 dim=50 epoch=10 lr=0.5 thread=2, on our train rows, tested on our test rows",
          "accuracy": f"ours: mean over train.seed {args.seeds}; fastText: mean of {args.peer_runs} runs",
          "yelp_polarity_test": "the Yelp Review Full sample mapped to polarity: stars 1-2 negative, 4-5 positive, 3 left out",
          "results": results, "all_text_targets_met": bool(text) and all(r["meets_target"] for r in text)})


if __name__ == "__main__":
    main()
