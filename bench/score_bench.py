"""Benchmark score: rows/s of the Spark job (local[2]) vs the same model predicting the same
pre-featurized rows in one plain Python process (the ceiling), and vs a row-at-a-time Python
UDF doing the whole per-row work (both on the same --udf-rows rows, from the same file, on the
same 2 cores). Rows: AG News train rows resampled with a fixed seed. Targets (issue 18, at
--rows 1000000): the job >= 1.8x one process doing its whole per-row work (2x is the limit on 2
cores); the inference-bound model >= 0.7x its ceiling. The one process runs the job's own task
code over the job's splits (count lines, read, parse, clean, featurize, predict, write Parquet),
in rounds with the job and with the job under score.io=spark, so the machine's slow spells fall
on all three; ratios are medians of the rounds' ratios. Also reported: one process doing the
parse..predict part alone from lines already in memory, with no output (the earlier reference).
Each figure is the median of --repeats runs, after a warm-up run. For fastText the per-row cost
is featurization, not inference; --char-cnn-rows also times an inference-bound model (char_cnn,
untrained weights) against its own ceiling.

    .venv/bin/python bench/score_bench.py [--rows 1000000] [--udf-rows 100000] [--model runs/demo/train/model]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from common import AG_TEST, AG_TRAIN, ROOT, cpu_delta, emit, machine, resampled_ag_news, spark_cpu_seconds

from dl_pipeline.bundle import load_bundle
from dl_pipeline.config import SparkConfig, load_config, replace
from dl_pipeline.features import clean_record, featurize_texts
from dl_pipeline.fsutil import to_url
from dl_pipeline.line_splits import count_lines, plan
from dl_pipeline.prepare import prepare_dataset
from dl_pipeline.score import score_batch
from dl_pipeline.score_tasks import MAX_SPLIT_BYTES, ScoreTask, score_split
from dl_pipeline.scoring import predict, predict_texts
from dl_pipeline.sources import parse_and_clean_lines, parse_zhang_line
from dl_pipeline.spark import get_spark
from dl_pipeline.train.driver import train_model


def _model(spark, workdir: str, model: str | None) -> str:
    if model:
        return model
    path = os.path.join(workdir, "run", "model")
    if not os.path.exists(path):
        cfg = load_config(None, [
            f"data.train_path={AG_TRAIN}", f"data.test_path={AG_TEST}", "data.num_classes=4",
            f"prepare.output_path={workdir}/prepared", f"train.data_path={workdir}/prepared",
            f"train.run_dir={workdir}/run", "shard.max_workers=2", "train.launcher=local", "train.epochs=2",
            "train.progress=false",
        ])
        prepare_dataset(spark, cfg)
        train_model(cfg)
    return path


def _untrained_bundle(workdir: str, name: str, featurizer: dict, labels: dict) -> str:
    """A bundle of model ``name`` with seeded untrained weights: for timing inference only."""
    from dl_pipeline.bundle import save_bundle
    from dl_pipeline.models import build_model, model_spec

    spec = model_spec(name, featurizer, len(labels["names"]), 0, "small", 0.5)
    torch.manual_seed(0)
    return save_bundle(os.path.join(workdir, f"{name}_model"), build_model(spec).eval(), spec, featurizer, labels,
                       {"note": "untrained weights: for timing inference only"})


def _char_cnn_bundle(fasttext_path: str, workdir: str) -> str:
    """An untrained char_cnn bundle with the fastText bundle's featurizer and labels."""
    b = load_bundle(fasttext_path)
    return _untrained_bundle(workdir, "char_cnn", b.featurizer, b.labels)


def _inference_bound(spark, args, fasttext_path: str) -> dict:
    """Spark vs ceiling for a model whose inference, not featurization, dominates (char_cnn)."""
    path = _char_cnn_bundle(fasttext_path, args.workdir)
    n = args.char_cnn_rows
    data = resampled_ag_news(n, os.path.join(args.workdir, f"ag_{n}.csv"))
    out = os.path.join(args.workdir, "scores_char_cnn")
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, [f"score.model_path={path}", f"score.input_path={data}", f"score.output_path={out}",
                             "score.run_date=2026-11-22", "data.num_classes=4", "score.batch_size=256"])
    score_batch(spark, replace(cfg, score={"run_date": "2026-11-21"}))  # warm-up
    spark_s = _timed(lambda: score_batch(spark, cfg))
    bundle = load_bundle(path)
    with open(data, encoding="utf-8") as fh:
        texts = [clean_record(parse_zhang_line(line.rstrip("\n"), 3)[1], ". ") for line in fh]
    feats = {"chars": featurize_texts(texts, bundle.model_featurizer)["chars"]}
    ceiling_s = _timed(lambda: predict(bundle, feats, 256, 0))
    return {"model": "char_cnn small (untrained weights: inference cost only)", "rows": n,
            "spark_job": {"wall_s": round(spark_s, 2), "rows_per_s": round(n / spark_s, 1)},
            "ceiling_prefeaturized_one_process": {"wall_s": round(ceiling_s, 2), "rows_per_s": round(n / ceiling_s, 1)},
            "spark_vs_ceiling": round(ceiling_s / spark_s, 3)}


def _image_model(spark, args) -> dict:
    """Image scoring: PNG files of real Fashion-MNIST test images, an untrained LeNet bundle
    (inference cost only), Spark job vs the same model on pre-decoded pixels in one process
    (ceiling) and vs one process decoding the same files and predicting (reference)."""
    import numpy as np
    from PIL import Image

    from dl_pipeline.config import DataConfig
    from dl_pipeline.features import decode_image, image_spec
    from dl_pipeline.sources import parse_idx

    n = args.image_rows
    pixels = parse_idx(open(os.path.join(ROOT, "data", "sample", "fashion_mnist", "t10k-images-idx3-ubyte.gz"), "rb").read())[:n]
    folder = os.path.join(args.workdir, f"images_{n}")
    if not os.path.isdir(folder):
        os.makedirs(folder + ".tmp", exist_ok=True)
        for i, px in enumerate(pixels):
            Image.fromarray(px, mode="L").save(os.path.join(folder + ".tmp", f"{i:05d}.png"))
        os.replace(folder + ".tmp", folder)
    spec = image_spec(DataConfig())
    path = _untrained_bundle(args.workdir, "cnn", spec, {"label_base": 0, "names": [str(i) for i in range(10)]})
    out = os.path.join(args.workdir, "scores_images")
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, [f"score.model_path={path}", f"score.input_path={folder}", f"score.output_path={out}",
                             "score.input_format=image_files", "score.run_date=2026-11-22", "score.batch_size=128"])
    score_batch(spark, replace(cfg, score={"run_date": "2026-11-21"}))  # warm-up
    spark_s = statistics.median(_timed(lambda: score_batch(spark, cfg)) for _ in range(args.repeats))
    bundle = load_bundle(path)
    feats = {"image": pixels[..., None].copy()}
    ceiling_s = statistics.median(_timed(lambda: predict(bundle, feats, 128, 0)) for _ in range(args.repeats))
    blobs = [open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))]
    full_s = statistics.median(
        _timed(lambda: predict(bundle, {"image": np.stack([decode_image(b, spec) for b in blobs])}, 128, 0))
        for _ in range(args.repeats))
    return {"model": "cnn (LeNet, untrained weights: inference cost only)", "images": n, "input": "PNG files, 28x28 grayscale",
            "spark_job": {"wall_s": round(spark_s, 2), "images_per_s": round(n / spark_s, 1)},
            "ceiling_predecoded_one_process": {"wall_s": round(ceiling_s, 3), "images_per_s": round(n / ceiling_s, 1)},
            "one_process_decode_predict": {"wall_s": round(full_s, 3), "images_per_s": round(n / full_s, 1)},
            "spark_vs_ceiling": round(ceiling_s / spark_s, 3), "spark_vs_one_process_full": round(full_s / spark_s, 3)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _same_work_child(args_json: str) -> None:
    """The one-process reference, run in a fresh interpreter: for each of the job's splits,
    count its lines and score it (score_tasks.score_split), on one core. Prints [wall s, CPU s]."""
    from dl_pipeline.line_splits import LineSplit
    from dl_pipeline.scoring import worker_bundle

    a = json.loads(args_json)
    torch.set_num_threads(1)
    task = ScoreTask(**{**a["task"], "ids": tuple(a["task"]["ids"]), "scored_at": dt.datetime.fromisoformat(a["task"]["scored_at"])})
    splits = [LineSplit(**s) for s in a["splits"]]
    worker_bundle(task.model_url, task.version)  # loaded once, as in a warm Spark worker
    # Warm, as the job's workers are after its warm-up run: the first calls load numba's cached
    # kernel and set up torch's kernels (~0.5 s).
    warm = dataclasses.replace(task, stage=task.stage + "_warmup")
    score_split(LineSplit(splits[0].url, 0, min(splits[0].end, 1 << 16)), 1, 0, warm)
    t0, c0 = time.perf_counter(), time.process_time()
    first = 1
    for i, split in enumerate(splits):
        physical, _ = count_lines(split)
        score_split(split, first, i, task)
        first += physical
    print(json.dumps([time.perf_counter() - t0, time.process_time() - c0]))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--same-work-child":
        return _same_work_child(sys.argv[2])
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--udf-rows", type=int, default=100_000,
                    help="rows for the row-at-a-time UDF and the job on the same rows (enough that the job's fixed cost is small)")
    ap.add_argument("--model")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--char-cnn-rows", type=int, default=2000,
                    help="also time an inference-bound model (untrained char_cnn) on this many rows; 0: skip")
    ap.add_argument("--image-rows", type=int, default=4000,
                    help="also time an image model on this many PNG files (real Fashion-MNIST test images); 0: skip")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dlp-score-bench"))
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    spark = get_spark(SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "4"}))
    model_path = _model(spark, args.workdir, args.model)
    data = resampled_ag_news(args.rows, os.path.join(args.workdir, f"ag_{args.rows}.csv"))
    out = os.path.join(args.workdir, "scores")
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, [f"score.model_path={model_path}", f"score.input_path={data}", f"score.output_path={out}",
                             "score.run_date=2026-11-22", "data.num_classes=4"])
    score_batch(spark, replace(cfg, score={"run_date": "2026-11-21"}))  # warm-up: JVM, Python workers
    # The job against one process doing the same whole work with the job's own task code, on one
    # core: for each of the job's splits, count its lines, read them from the file, parse,
    # clean, featurize, predict, write its Parquet part (score_tasks.score_split). Runs in
    # pairs, one of each, so the machine's slow spells (single runs vary by ~25% here) fall on
    # both; the ratio is the median of the pairs' ratios.
    bundle = load_bundle(model_path)
    task = ScoreTask(model_url=to_url(model_path), version=bundle.version, ids=("source_file", "row_number"),
                     batch_size=cfg.score.batch_size, top_k=0, max_chars=cfg.data.max_text_chars,
                     separator=bundle.featurizer["cleaning"]["title_separator"], num_fields=3,
                     records_per_batch=cfg.score.max_records_per_batch, stage=to_url(os.path.join(args.workdir, "one_process")),
                     date="2026-11-22", scored_at=dt.datetime.now(dt.timezone.utc))
    splits = plan({to_url(data): os.path.getsize(data)}, 2 * spark.sparkContext.defaultParallelism, MAX_SPLIT_BYTES)

    def one_process_same_work():
        """-> (wall s, CPU s) of the work in a fresh interpreter (as a Spark worker is one), timed
        there after its imports and the model's load (a warm worker has both)."""
        args_json = json.dumps({"data": data, "task": {**task.__dict__, "scored_at": task.scored_at.isoformat()},
                                "splits": [s.__dict__ for s in splits]})
        out = subprocess.run([sys.executable, __file__, "--same-work-child", args_json], check=True, capture_output=True,
                             text=True).stdout
        wall, cpu = json.loads(out.strip().splitlines()[-1])
        return wall, cpu

    # The same job with Spark's own text reader and Parquet writer (score.io=spark), in the same
    # rounds: the part of the cost that was the JVM's moving of rows.
    spark_io_cfg = replace(cfg, score={"io": "spark", "output_path": os.path.join(args.workdir, "scores_io_spark")})
    score_batch(spark, replace(spark_io_cfg, score={"run_date": "2026-11-21"}))  # warm-up
    spark_runs, same_runs, spark_io_runs, spark_cpu, spark_io_cpu, same_cpu = [], [], [], {}, {}, 0.0
    for _ in range(args.repeats):
        c0 = spark_cpu_seconds()
        spark_io_runs.append(_timed(lambda: score_batch(spark, spark_io_cfg)))
        for k, v in cpu_delta(c0, spark_cpu_seconds()).items():
            spark_io_cpu.setdefault(k, []).append(v)
        c0 = spark_cpu_seconds()
        t0 = time.perf_counter()
        summary = score_batch(spark, cfg)["summary"]  # the same date: each run replaces the last
        spark_runs.append(time.perf_counter() - t0)
        for k, v in cpu_delta(c0, spark_cpu_seconds()).items():
            spark_cpu.setdefault(k, []).append(v)
        wall, cpu = one_process_same_work()
        same_runs.append(wall)
        same_cpu += cpu
    torch.set_num_threads(2)
    # Per run, the median of the runs (a Python worker that ends during a run takes its CPU
    # seconds with it: the counters of live processes are summed).
    spark_cpu = {k: round(statistics.median(v), 2) for k, v in spark_cpu.items()}
    spark_io_cpu = {k: round(statistics.median(v), 2) for k, v in spark_io_cpu.items()}
    spark_s, spark_io_s = statistics.median(spark_runs), statistics.median(spark_io_runs)
    pair_ratios = [b / a for a, b in zip(spark_runs, same_runs, strict=True)]

    # Ceiling: one process, 2 threads, same model, rows featurized beforehand (not timed).
    torch.set_num_threads(2)
    bundle = load_bundle(model_path)
    with open(data, encoding="utf-8") as fh:
        texts = [clean_record(parse_zhang_line(line.rstrip("\n"), 3)[1], ". ") for line in fh]
    feats = featurize_texts(texts, bundle.featurizer)
    feats = {k: v for k, v in feats.items() if k == "tokens"} if bundle.model_spec["name"] == "fasttext" else feats
    ceiling_s = statistics.median(_timed(lambda: predict(bundle, feats, 1024, 0)) for _ in range(args.repeats))
    # The job's whole per-row work (parse + clean + featurize + predict) in one process, from
    # the raw lines already in memory, for reference.
    with open(data, encoding="utf-8") as fh:
        lines = fh.read().splitlines()

    def one_process_full():
        parsed = parse_and_clean_lines(lines, 3, bundle.featurizer["cleaning"]["title_separator"], cfg.data.max_text_chars,
                                       reject_invalid_utf8=False)
        return predict_texts(bundle, [t or "" for t in parsed.text], 1024)

    c0 = time.process_time()
    one_process_full_s = statistics.median(_timed(one_process_full) for _ in range(args.repeats))
    one_process_cpu_us = (time.process_time() - c0) / args.repeats / args.rows * 1e6
    torch.set_num_threads(2)
    # The same with torch on one thread: the process then uses one core throughout, the
    # reference against which 2 cores can give at most 2x.
    torch.set_num_threads(1)
    one_process_1thread_s = statistics.median(_timed(one_process_full) for _ in range(args.repeats))
    torch.set_num_threads(2)

    # Row-at-a-time Python UDF: the naive way (a plain udf, model cached per worker).
    from pyspark.sql import functions as F

    model_url, model_version = model_path, bundle.version

    @F.udf("int")
    def predict_row(title, text):
        from dl_pipeline.scoring import worker_bundle

        b = worker_bundle(model_url, model_version)
        f = featurize_texts([clean_record([title, text], ". ")], b.featurizer)
        return int(predict(b, f, 1, 0)["index"][0]) + 1

    # Both sides on the same cores (this local[2] session) and the same rows: the first
    # --udf-rows rows of the corpus (the same seed draws the same rows first), read from the
    # same file, each side timed from its CSV to its output.
    udf_data = resampled_ag_news(args.udf_rows, os.path.join(args.workdir, f"ag_{args.udf_rows}.csv"))
    udf_s = statistics.median(
        _timed(lambda: spark.read.csv(udf_data).select(predict_row("_c1", "_c2").alias("p"))
               .write.mode("overwrite").format("noop").save())
        for _ in range(args.repeats)
    )
    udf_cfg = replace(cfg, score={"input_path": udf_data, "output_path": os.path.join(args.workdir, "scores_udf_rows")})
    job_on_udf_rows_s = statistics.median(_timed(lambda: score_batch(spark, udf_cfg)) for _ in range(args.repeats))

    spark_rps = args.rows / spark_s
    torch.set_num_threads(2)
    inference_bound = _inference_bound(spark, args, model_path) if args.char_cnn_rows else None
    image_model = _image_model(spark, args) if args.image_rows else None
    emit({
        "benchmark": "score",
        "data": f"{args.rows} AG News rows resampled with a fixed seed (2015): label+body of one real row, title of another",
        "model": bundle.version,
        "machine": machine(),
        "spark_master": "local[2]",
        "repeats": args.repeats,
        "spark_job": {"wall_s": round(spark_s, 2), "rows_per_s": round(spark_rps), "rows_in": summary["rows_in"],
                      "scored": summary["scored"], "runs_s": [round(x, 2) for x in spark_runs],
                      "cpu_s_per_run": spark_cpu, "cpu_us_per_row": round(sum(spark_cpu.values()) / args.rows * 1e6, 2)},
        "spark_job_score_io_spark": {"wall_s": round(spark_io_s, 2), "rows_per_s": round(args.rows / spark_io_s),
                                     "runs_s": [round(x, 2) for x in spark_io_runs],
                                     "own_io_vs_spark_io": round(statistics.median(b / a for a, b in zip(spark_runs, spark_io_runs, strict=True)), 3),
                                     "cpu_s_per_run": spark_io_cpu,
                                     "cpu_us_per_row": round(sum(spark_io_cpu.values()) / args.rows * 1e6, 2)},
        "ceiling_prefeaturized_one_process": {"wall_s": round(ceiling_s, 3), "rows_per_s": round(args.rows / ceiling_s)},
        "one_process_parse_clean_featurize_predict": {"wall_s": round(one_process_full_s, 2),
                                                      "rows_per_s": round(args.rows / one_process_full_s),
                                                      "torch_threads": 2, "cpu_us_per_row": round(one_process_cpu_us, 2)},
        "one_process_same_work_as_the_job": {
            "wall_s": round(statistics.median(same_runs), 2), "runs_s": [round(x, 2) for x in same_runs],
            "rows_per_s": round(args.rows / statistics.median(same_runs)), "torch_threads": 1,
            "cpu_us_per_row": round(same_cpu / args.repeats / args.rows * 1e6, 2),
            "what": "the job's splits one after another in a fresh interpreter, timed after its imports and model "
                    "load: count lines, read, parse, clean, featurize, predict, write Parquet "
                    "(score_tasks.count_lines + score_split)"},
        "one_process_parse_clean_featurize_predict_1_thread": {"wall_s": round(one_process_1thread_s, 2),
                                                               "rows_per_s": round(args.rows / one_process_1thread_s)},
        "row_at_a_time_udf": {"rows": args.udf_rows, "wall_s": round(udf_s, 2), "rows_per_s": round(args.udf_rows / udf_s),
                              "spark_job_on_the_same_rows_wall_s": round(job_on_udf_rows_s, 2)},
        "spark_vs_ceiling": round(spark_rps / (args.rows / ceiling_s), 4),
        "spark_vs_one_process_same_work": round(statistics.median(pair_ratios), 3),
        "spark_vs_one_process_same_work_pairs": [round(x, 3) for x in pair_ratios],
        "spark_vs_one_process_full": round(spark_rps / (args.rows / one_process_full_s), 3),
        "spark_io_spark_vs_one_process_full": round(one_process_full_s / spark_io_s, 3),
        "spark_vs_one_process_full_1_thread": round(spark_rps / (args.rows / one_process_1thread_s), 3),
        "spark_vs_row_udf": round(udf_s / job_on_udf_rows_s, 2),
        "inference_bound_model": inference_bound,
        "image_model": image_model,
    })


if __name__ == "__main__":
    main()
