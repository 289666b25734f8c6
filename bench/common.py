"""Shared benchmark helpers: reproducible resampled corpora and the machine description.

Scale figures need more rows than the shared samples hold: corpora here are built by
recombining the fields of real AG News rows with a fixed seed (no synthetic text), and every JSON
report says so.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import platform
import random
import resource
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
AG_TRAIN = os.path.join(ROOT, "data", "sample", "ag_news", "train.csv.gz")
AG_TEST = os.path.join(ROOT, "data", "sample", "ag_news", "test.csv.gz")
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))  # real samples, see its README


def resampled_ag_news(n_rows: int, path: str, seed: int = 2015) -> str:
    """Write ``n_rows`` CSV rows resampled from the real AG News train rows.

    Each row takes the label and body of one real row and the title of another, both drawn
    with a fixed seed: every field is real text, yet rows are almost all distinct (plain
    resampling of 10k rows would make ~99% of a 1M corpus exact duplicates, which prepare
    removes, so it would measure de-duplication rather than cleaning and featurization).
    """
    if os.path.exists(path):
        return path
    with gzip.open(AG_TRAIN, "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    rng = random.Random(seed)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
        for _ in range(n_rows):
            label, _, body = rows[rng.randrange(len(rows))]
            title = rows[rng.randrange(len(rows))][1]
            writer.writerow([label, title, body])
    os.replace(tmp, path)
    return path


def yelp_full_as_polarity(path: str) -> str:
    """The Yelp Review Full sample (1,000 rows, 5 star classes) as a polarity test file at ``path``:
    stars 1-2 -> 1 (negative), 4-5 -> 2 (positive), 3 left out (800 rows). Every report that uses
    it says so."""
    if os.path.exists(path):
        return path
    with gzip.open(os.path.join(SHARED, "yelp_review_full", "sample.csv.gz"), "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    polarity = {"1": "1", "2": "1", "4": "2", "5": "2"}
    tmp = path + ".tmp"
    with gzip.open(tmp, "wt", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerows([polarity[label], text] for label, text in rows if label in polarity)
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


def _stat_seconds(path: str, children: bool = False) -> float:
    """utime + stime (+ reaped children's) of /proc/<pid>[/task/<tid>]/stat, in seconds."""
    with open(path) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def spark_cpu_seconds() -> dict:
    """CPU seconds used so far by this machine's local Spark: the JVM (all threads, its JIT
    compiler threads apart) and the Python worker daemon with its workers. Linux only ({}
    elsewhere); take the difference of two calls around a run.

    It says where a local[N] run's cores go: the same Python work as the single-process
    baseline, plus what Spark adds (JVM, Arrow transfer, JIT warm-up).
    """
    import glob

    out = {"jvm": 0.0, "jvm_jit_compiler": 0.0, "python_workers": 0.0}
    if not os.path.isdir("/proc/self/task"):
        return {}
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            cmd = open(proc + "/cmdline", "rb").read()
            if b"org.apache.spark.deploy.SparkSubmit" in cmd:
                out["jvm"] += _stat_seconds(proc + "/stat")
                for task in glob.glob(proc + "/task/*"):
                    if "CompilerThre" in open(task + "/comm").read():  # "C2 CompilerThread0", cut to 15
                        out["jvm_jit_compiler"] += _stat_seconds(task + "/stat")
            elif b"pyspark.daemon" in cmd or b"dl_pipeline.pyworker" in cmd:
                # The daemon's reaped children count too: a worker that exited is still included.
                out["python_workers"] += _stat_seconds(proc + "/stat", children=True)
        except (OSError, ValueError, IndexError):
            continue  # the process or thread ended while we looked
    return out


def cpu_delta(before: dict, after: dict) -> dict:
    return {k: round(after[k] - before.get(k, 0.0), 2) for k in after}


def fasttext_peer(spark, cfg, workdir: str, epochs: int = 10, repeats: int = 1) -> dict:
    """The peer: fastText 0.9.3 (``wordNgrams=2 dim=50 lr=0.5``, 2 threads, ``epochs``) on exactly
    our rows: the prepared train/test row ids joined back to their cleaned text, our tokens
    space-joined, in our shards' (shuffled) order. Our val rows are not in its train file.
    fastText's runs differ (its threads race on the weights): ``repeats`` > 1 trains it that many
    times and reports the mean test accuracy and each run's (``test_accuracies``)."""
    import time

    import fasttext
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dl_pipeline import fsutil
    from dl_pipeline.dataset import split_url
    from dl_pipeline.features import check_record, content_hashes, tokenize
    from dl_pipeline.prepare_tasks import row_ids
    from dl_pipeline.sources import parse_zhang_line

    out = cfg.prepare.output_path
    texts = []  # every parsed and cleaned text of the inputs; our row ids are their content hashes
    for path in (cfg.data.train_path, cfg.data.test_path):
        with open(fsutil.local_path(fsutil.to_url(path)) or path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                _, parts, reason = parse_zhang_line(line.rstrip("\r\n"), cfg.data.num_fields)
                if reason is None:
                    texts.append(check_record(parts, cfg.data.title_separator, cfg.data.max_text_chars)[1] or "")
    text_of = dict(zip(row_ids(content_hashes(pa.array(texts, pa.string()))).to_pylist(), texts, strict=True))
    files, rows = {}, {}
    for split in ("train", "test"):
        # our row order: fastText reads its file in order, we shuffle; give it our shards' (already shuffled) order
        t = pq.read_table(fsutil.local_path(split_url(out, split)), columns=["row_id", "label"])
        files[split] = os.path.join(workdir, f"fasttext_{split}.txt")
        with open(files[split], "w") as fh:
            for rid, label in zip(t["row_id"].to_pylist(), t["label"].to_pylist(), strict=True):
                fh.write(f"__label__{label} {' '.join(tokenize(text_of[rid]))}\n")
        rows[split] = t.num_rows
    walls, accuracies = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model = fasttext.train_supervised(files["train"], wordNgrams=2, dim=50, lr=0.5, epoch=epochs, thread=2, verbose=0)
        walls.append(time.perf_counter() - t0)
        n, accuracy, _ = model.test(files["test"])
        assert n == rows["test"], (n, rows["test"])
        accuracies.append(round(accuracy, 4))
    wall = sorted(walls)[len(walls) // 2]
    return {"samples_per_s": round(rows["train"] * epochs / wall), "train_wall_s": round(wall, 2),
            "test_accuracy": round(sum(accuracies) / repeats, 4), "test_accuracies": accuracies,
            "train_rows": rows["train"], "test_rows": n,
            "settings": f"fasttext {fasttext.__version__ if hasattr(fasttext, '__version__') else '0.9.3'}: "
                        f"wordNgrams=2 dim=50 lr=0.5 epoch={epochs} thread=2 (its own tokens: ours, space-joined)"}


def _spark_processes() -> dict[str, list[int]]:
    """pids of this machine's local Spark: the JVM, and the Python worker daemon with its workers."""
    import glob

    out: dict[str, list[int]] = {"jvm": [], "python_workers": []}
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            cmd = open(proc + "/cmdline", "rb").read()
        except OSError:
            continue
        if b"org.apache.spark.deploy.SparkSubmit" in cmd:
            out["jvm"].append(int(proc[6:]))
        elif b"pyspark.daemon" in cmd or b"dl_pipeline.pyworker" in cmd:
            out["python_workers"].append(int(proc[6:]))
    return out


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class SparkMemory:
    """Peak resident memory (MB) of a local Spark run, sampled from /proc every ``interval`` s:
    the driver's Python process (this one), the JVM (in local mode the driver and the executor
    are this one JVM), and the executor's Python workers (their sum at any instant, and the
    largest one). Linux only (zeros elsewhere). Use as a context manager around one run."""

    def __init__(self, interval: float = 0.25, spark=None, heap_interval: float = 2.0):
        self.interval = interval
        self.spark = spark  # given: also the JVM heap's live data (see _heap_mb)
        # The heap's pools are looked up once: looking them up at every sample (py4j proxies for
        # every bean, name and type) cost the JVM 4.5 CPU-s in 20 s idle (22% of a core), which
        # the bench charged to the job; reading the cached pools every 0.25 s still cost 0.3
        # CPU-s in 20 s (~5 s in a 10M-row run), so the heap, which moves slowly, is read every
        # ``heap_interval`` s and at the end; /proc every ``interval`` s (no JVM work).
        self._pools = None
        self.heap_interval = heap_interval
        self.peaks = {"driver_python_mb": 0.0, "jvm_driver_and_executor_mb": 0.0, "executor_python_workers_sum_mb": 0.0,
                      "executor_python_worker_max_mb": 0.0}
        if spark is not None:
            self.peaks.update(jvm_heap_after_gc_mb=0.0, jvm_old_gen_used_mb=0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _heap_mb(self) -> tuple[float, float]:
        """The JVM heap via JMX: its pools as the last garbage collection of each left them
        (live data; RSS is what the heap was allowed to grow to), and the old generation's
        current use (live data plus garbage not yet collected there)."""
        if self._pools is None:
            beans = self.spark._jvm.java.lang.management.ManagementFactory.getMemoryPoolMXBeans()
            self._pools = [(pool, "Old" in pool.getName() or "Tenured" in pool.getName())
                           for pool in beans if str(pool.getType()) == "Heap memory"]
        after_gc = old = 0
        for pool, is_old in self._pools:
            usage = pool.getCollectionUsage()
            after_gc += usage.getUsed() if usage is not None else 0
            if is_old:
                old += pool.getUsage().getUsed()
        return after_gc / 2**20, old / 2**20

    def _sample(self, heap: bool = True) -> None:
        procs = _spark_processes()
        workers = [_rss_mb(p) for p in procs["python_workers"]]
        now = {"driver_python_mb": _rss_mb(os.getpid()), "jvm_driver_and_executor_mb": sum(_rss_mb(p) for p in procs["jvm"]),
               "executor_python_workers_sum_mb": sum(workers), "executor_python_worker_max_mb": max(workers, default=0.0)}
        if self.spark is not None and heap:
            try:
                now["jvm_heap_after_gc_mb"], now["jvm_old_gen_used_mb"] = self._heap_mb()
            except Exception:  # the gateway is busy or closing: skip this sample
                pass
        for k, v in now.items():
            self.peaks[k] = max(self.peaks[k], round(v, 1))

    def _run(self) -> None:
        next_heap = 0.0
        while not self._stop.is_set():
            heap = time.monotonic() >= next_heap
            self._sample(heap)
            if heap:
                next_heap = time.monotonic() + self.heap_interval
            time.sleep(self.interval)
        self._sample()

    def __enter__(self) -> SparkMemory:
        if os.path.isdir("/proc/self"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

