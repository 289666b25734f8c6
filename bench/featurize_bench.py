"""Benchmark featurization: CPU-us per row of ``featurize_texts`` against the implementation it
replaced, on the same cleaned rows, in the same process.

The peer is ``dl_pipeline/features.py`` as of commit BASELINE (vectorised numpy: a byte-class
tokenizer and a 2-byte-step CRC-32 over whole batches), loaded from git history, so it is
measured on this machine in this run rather than quoted. Both must give identical arrays on
every row first. Rows: ``--rows`` resampled real AG News rows (bench/common.py), cleaned as
prepare cleans them; and the DBpedia sample (more non-ASCII text). Specs: the default text spec
(chars + tokens) and tokens only (what the fastText model reads). CPU seconds of this one
thread, best and median of ``--repeats``; the kernel's first call (compile, or load from
numba's cache) is reported apart.

    .venv/bin/python bench/featurize_bench.py [--rows 100000] [--repeats 5]

Target: >= 5x fewer CPU-seconds per row than the baseline on the AG News rows.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
from common import ROOT, SHARED, emit, machine, resampled_ag_news

from dl_pipeline import features
from dl_pipeline.config import DataConfig, FeaturesConfig
from dl_pipeline.sources import parse_zhang_line

BASELINE = "fa68bda"  # the last commit with the numpy featurizer


def baseline_module():
    """features.py at BASELINE, imported as a module of its own."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{BASELINE}:dl_pipeline/features.py"],
                            check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "features_baseline.py")
    with open(path, "w") as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location("features_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cleaned_rows(path: str, num_fields: int, opener=open) -> list[str]:
    texts = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            label, parts, reason = parse_zhang_line(line.rstrip("\n"), num_fields)
            if not reason:
                texts.append(features.clean_record(parts, ". "))
    return texts


def cpu_us_per_row(fn, texts, repeats: int) -> dict:
    """CPU-us per row of fn(texts): best and median of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn(texts)
        times.append(time.process_time() - c0)
    return {"best": round(min(times) / len(texts) * 1e6, 3), "median": round(statistics.median(times) / len(texts) * 1e6, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/dlp-bench")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    corpora = {
        "ag_news": cleaned_rows(resampled_ag_news(args.rows, os.path.join(args.workdir, f"ag_{args.rows}.csv")), 3),
        "dbpedia_sample": cleaned_rows(os.path.join(SHARED, "dbpedia", "sample_a.csv.gz"), 3, gzip.open),
    }
    old = baseline_module()
    specs = {
        "chars+tokens": features.text_spec(FeaturesConfig(), DataConfig()),
        "tokens": features.text_spec(FeaturesConfig(chars=False), DataConfig()),
    }
    cache = os.path.join(ROOT, "dl_pipeline", "__pycache__")
    cached_before = any(f.startswith("text_kernel.") and f.endswith(".nbi") for f in os.listdir(cache)) if os.path.isdir(cache) else False
    c0, t0 = time.process_time(), time.perf_counter()
    features.featurize_texts(["warm up the kernel"], specs["chars+tokens"])
    first_call = {"cpu_s": round(time.process_time() - c0, 3), "wall_s": round(time.perf_counter() - t0, 3),
                  "numba_cache_present_before": cached_before}
    results = {}
    for corpus, texts in corpora.items():
        non_ascii = sum(not t.isascii() for t in texts)
        for name, spec in specs.items():
            new_out = features.featurize_texts(texts, spec)
            old_out = old.featurize_texts(texts, spec)
            identical = sorted(new_out) == sorted(old_out) and all(np.array_equal(new_out[k], old_out[k]) for k in new_out)
            if not identical:
                sys.exit(f"featurize_bench: {corpus}/{name}: the new featurizer's arrays differ from {BASELINE}'s")
            new = cpu_us_per_row(lambda x, s=spec: features.featurize_texts(x, s), texts, args.repeats)
            # prepare's path: the cleaned texts are already an Arrow column, read in place.
            arrow = pa.array(texts, pa.large_string())
            from_arrow = cpu_us_per_row(lambda x, s=spec: features.featurize_texts(x, s), arrow, args.repeats)
            base = cpu_us_per_row(lambda x, s=spec: old.featurize_texts(x, s), texts, args.repeats)
            results[f"{corpus}/{name}"] = {
                "rows": len(texts), "non_ascii_rows": non_ascii, "identical_arrays": identical,
                "cpu_us_per_row": new, "cpu_us_per_row_from_arrow": from_arrow,
                f"baseline_{BASELINE}_cpu_us_per_row": base,
                "fewer_cpu_seconds_x": round(base["best"] / new["best"], 2),
                "fewer_cpu_seconds_x_median": round(base["median"] / new["median"], 2),
                "fewer_cpu_seconds_x_from_arrow": round(base["best"] / from_arrow["best"], 2),
            }
    ag = [v["fewer_cpu_seconds_x"] for k, v in results.items() if k.startswith("ag_news/")]
    emit({
        "bench": "featurize", "machine": machine(), "threads": 1, "baseline_commit": BASELINE,
        "first_call": first_call, "results": results,
        "target": ">= 5x fewer CPU-seconds per row than the baseline on AG News", "target_met": min(ag) >= 5,
        "numba_cache_dir": cache,
    })


if __name__ == "__main__":
    csv.field_size_limit(1 << 24)
    main()
