"""Benchmark featurization: CPU-us per row of ``featurize_texts`` against the implementation it
replaced, on the same cleaned rows, in the same process.

The peer is ``dl_pipeline/features.py`` as of commit BASELINE (vectorised numpy: a byte-class
tokenizer and a 2-byte-step CRC-32 over whole batches), loaded from git history, so it is
measured on this machine in this run rather than quoted. Measured: the default featurizer
(version 2: ``word64`` token ids) and version 1's (``features.token_hash=crc32``, the ids the
baseline computes), each from a Python list of str (score's path) and from an Arrow column
(prepare's path). Checked first, on every row: version 1's arrays identical to the baseline's;
version 2's chars identical to the baseline's and its token ids equal to the definition
computed row by row in Python (``features.tokenize``, ``features.word64``). Rows: ``--rows``
resampled real AG News rows (bench/common.py), cleaned as prepare cleans them; and the DBpedia
sample (more non-ASCII text). Specs: the default text spec (chars + tokens) and tokens only
(what the fastText model reads). CPU seconds of this one thread, measured in rounds (each round
runs every variant once, so a slow spell of this noisy machine hits them all), best and median
of ``--repeats``; the kernel's first call (compile, or load from numba's cache) apart.

    .venv/bin/python bench/featurize_bench.py [--rows 100000] [--repeats 5]

Target: >= 5x fewer CPU-seconds per row than the baseline on the AG News rows, both specs, with
the default featurizer (version 2), from a list and from an Arrow column.
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
from functools import partial

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


def cpu_us_per_row(fns: dict, repeats: int, rows: int) -> dict:
    """{name: CPU-us per row (best, median)} of each fn(), in ``repeats`` rounds of all of them."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0 = time.process_time()
            fn()
            times[name].append(time.process_time() - c0)
    return {name: {"best": round(min(t) / rows * 1e6, 3), "median": round(statistics.median(t) / rows * 1e6, 3)}
            for name, t in times.items()}


def definition_ids(texts: list[str], spec: dict) -> np.ndarray:
    """Token ids [n, max_tokens] by the version 2 definition, one row at a time in Python."""
    ts = spec["tokens"]
    buckets, t = ts["buckets"], ts["max_tokens"]
    out = np.zeros((len(texts), t), np.int32)
    for i, text in enumerate(texts):
        h = [features.word64(w.encode("utf-8")) for w in features.tokenize(text[: 32 * t])]
        grams = [((x >> 32) * buckets >> 32) + 1 for x in h]
        grams += [((((a * 116049371 + b) % 2**64) >> 32) * buckets >> 32) + 1 for a, b in zip(h, h[1:], strict=False)]
        out[i, : min(len(grams), t)] = grams[:t]
    return out


def check(corpus: str, name: str, texts: list[str], v2: dict, v1: dict, old) -> None:
    """Exits unless version 1 equals the baseline and version 2 the definition, on every row."""
    v1_out, base_out, v2_out = features.featurize_texts(texts, v1), old.featurize_texts(texts, v1), features.featurize_texts(texts, v2)
    if sorted(v1_out) != sorted(base_out) or not all(np.array_equal(v1_out[k], base_out[k]) for k in v1_out):
        sys.exit(f"featurize_bench: {corpus}/{name}: version 1's arrays differ from {BASELINE}'s")
    if "chars" in v2_out and not np.array_equal(v2_out["chars"], base_out["chars"]):
        sys.exit(f"featurize_bench: {corpus}/{name}: version 2's chars differ from {BASELINE}'s")
    if not np.array_equal(v2_out["tokens"], definition_ids(texts, v2)):
        sys.exit(f"featurize_bench: {corpus}/{name}: version 2's token ids differ from the word64 definition")


def variants(texts: list[str], arrow, v2: dict, v1: dict, old) -> dict:
    """What is timed, by name: each featurizer version from a list and from Arrow, the baseline,
    and the list's conversion to Arrow alone (a part of the list figures)."""
    f = features.featurize_texts
    return {"v2_list": partial(f, texts, v2), "v2_arrow": partial(f, arrow, v2),
            "v1_list": partial(f, texts, v1), "v1_arrow": partial(f, arrow, v1),
            "baseline": partial(old.featurize_texts, texts, v1), "list_to_arrow": partial(pa.array, texts, pa.large_string())}


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
    specs = {  # name: (version 2, the default; version 1: crc32 ids, as the baseline)
        "chars+tokens": tuple(features.text_spec(FeaturesConfig(token_hash=h), DataConfig()) for h in ("word64", "crc32")),
        "tokens": tuple(features.text_spec(FeaturesConfig(chars=False, token_hash=h), DataConfig()) for h in ("word64", "crc32")),
    }
    cache = os.path.join(ROOT, "dl_pipeline", "__pycache__")
    cached_before = any(f.startswith("text_kernel.") and f.endswith(".nbi") for f in os.listdir(cache)) if os.path.isdir(cache) else False
    c0, t0 = time.process_time(), time.perf_counter()
    features.featurize_texts(["warm up the kernel"], specs["chars+tokens"][0])
    first_call = {"cpu_s": round(time.process_time() - c0, 3), "wall_s": round(time.perf_counter() - t0, 3),
                  "numba_cache_present_before": cached_before}
    results = {}
    for corpus, texts in corpora.items():
        non_ascii = sum(not t.isascii() for t in texts)
        arrow = pa.array(texts, pa.large_string())  # prepare's path: the cleaned texts as an Arrow column, read in place
        for name, (v2, v1) in specs.items():
            check(corpus, name, texts, v2, v1, old)
            cpu = cpu_us_per_row(variants(texts, arrow, v2, v1, old), args.repeats, len(texts))
            base = cpu.pop("baseline")
            results[f"{corpus}/{name}"] = {
                "rows": len(texts), "non_ascii_rows": non_ascii, "checked_rows": len(texts),
                "cpu_us_per_row": cpu, f"baseline_{BASELINE}_cpu_us_per_row": base,
                "fewer_cpu_seconds_x": {k: round(base["best"] / v["best"], 2) for k, v in cpu.items() if k != "list_to_arrow"},
                "fewer_cpu_seconds_x_median": {k: round(base["median"] / v["median"], 2) for k, v in cpu.items()
                                               if k != "list_to_arrow"},
            }
    ag = [x for k, v in results.items() if k.startswith("ag_news/") for p, x in v["fewer_cpu_seconds_x"].items() if p.startswith("v2")]
    emit({
        "bench": "featurize", "machine": machine(), "threads": 1, "baseline_commit": BASELINE,
        "first_call": first_call, "results": results,
        "target": ">= 5x fewer CPU-seconds per row than the baseline on AG News (version 2, both specs, list and Arrow)",
        "target_met": min(ag) >= 5, "numba_cache_dir": cache,
    })


if __name__ == "__main__":
    csv.field_size_limit(1 << 24)
    main()
