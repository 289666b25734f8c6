"""Transfer learning on real rows: pre-train on Amazon Review Polarity, fine-tune on 200 Yelp rows.

  * pre-train: the Amazon Review Polarity sample (test_head, 6,459 rows; 80% train), defaults;
  * fine-tune: the 200 Yelp Review Polarity training rows (train_head; 5% of them val), the
    defaults plus ``train.init_from`` (and, as a second variant, ``train.freeze: [embedding]``);
  * test: the Yelp Review Full sample mapped to polarity (stars 1-2 negative, 4-5 positive,
    3 left out: 800 rows), for every model here;
  * peers on the same 200 rows: ours from scratch and fastText 0.9.3 (wordNgrams=2 dim=50
    epoch=10 lr=0.5, 2 threads). Targets: fine-tuned >= scratch + 5 pts and >= fastText.

    .venv/bin/python bench/transfer_bench.py [--workdir /tmp/dlp-transfer]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from accuracy_bench import run_case
from common import emit, machine

from dl_pipeline.config import SparkConfig
from dl_pipeline.spark import get_spark


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dlp-accuracy"))
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    spark = get_spark(SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "4"}))
    source = run_case(spark, "amazon_polarity", "default", args.workdir, args.num_proc, peer=False)
    scratch = run_case(spark, "yelp_polarity", "default", args.workdir, args.num_proc, peer=True)
    tuned = run_case(spark, "yelp_polarity", "default", args.workdir, args.num_proc, peer=False,
                     extra=(f"train.init_from={source['bundle']}",), run="init_from")
    frozen = run_case(spark, "yelp_polarity", "default", args.workdir, args.num_proc, peer=False,
                      extra=(f"train.init_from={source['bundle']}", "train.freeze=[embedding]"), run="init_from_frozen")
    best = max(tuned["test_accuracy"], frozen["test_accuracy"])
    ft = scratch["fasttext"]["test_accuracy"]
    emit({
        "benchmark": "transfer", "machine": machine(), "launcher": f"spark (horovod.spark.run, {args.num_proc} ranks, Gloo, CPU)",
        "test_rows": "the Yelp Review Full sample mapped to polarity: stars 1-2 negative, 4-5 positive, 3 left out (800 rows)",
        "pretrained_on_amazon_polarity": source,
        "scratch_200_yelp_rows": scratch,
        "fine_tuned_200_yelp_rows": tuned,
        "fine_tuned_frozen_embedding": frozen,
        "fasttext_200_yelp_rows": scratch["fasttext"],
        "points_over_scratch": {"fine_tuned": round(100 * (tuned["test_accuracy"] - scratch["test_accuracy"]), 2),
                                "frozen_embedding": round(100 * (frozen["test_accuracy"] - scratch["test_accuracy"]), 2)},
        "points_over_fasttext": {"fine_tuned": round(100 * (tuned["test_accuracy"] - ft), 2),
                                 "frozen_embedding": round(100 * (frozen["test_accuracy"] - ft), 2)},
        "targets_met": {"scratch_plus_5": 100 * (best - scratch["test_accuracy"]) >= 5, "fasttext": best >= ft},
    })


if __name__ == "__main__":
    main()
