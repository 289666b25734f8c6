"""Shared benchmark helpers: reproducible resampled corpora and the machine description.

Scale figures need more rows than the shared samples hold: corpora here are built by
resampling the real AG News rows with a fixed seed (no synthetic text), and every JSON
report says so.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import random
import resource
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
AG_TRAIN = os.path.join(ROOT, "data", "sample", "ag_news", "train.csv.gz")
AG_TEST = os.path.join(ROOT, "data", "sample", "ag_news", "test.csv.gz")


def resampled_ag_news(n_rows: int, path: str, seed: int = 2015) -> str:
    """Write ``n_rows`` lines drawn with replacement from the real AG News train rows."""
    if os.path.exists(path):
        return path
    with gzip.open(AG_TRAIN, "rt", encoding="utf-8") as fh:
        lines = [ln if ln.endswith("\n") else ln + "\n" for ln in fh]
    rng = random.Random(seed)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for _ in range(n_rows):
            out.write(lines[rng.randrange(len(lines))])
    os.replace(tmp, path)
    return path


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def emit(doc: dict) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))
