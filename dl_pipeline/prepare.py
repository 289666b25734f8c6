"""prepare: raw datasets -> cleaned, featurized, sharded typed-Parquet datasets (read with Petastorm) plus a manifest.

Pipeline (driver code; the tasks' code is in prepare_tasks)::

    inputs -> spill: Python tasks read their byte ranges of line-mode Zhang CSV (or Spark reads
              the other formats), check labels and text, set rejects aside and spill the rest
              by row group (the rows' content and seed decide it), all in _spill/
           -> write_outputs: four tasks per core de-duplicate each row group, split, order,
              featurize and write train/ val/ test/, and write rejects/ (the spill's rejects,
              duplicates and conflicts), row numbers made whole
           -> accounting identity checked -> publish: manifest.json switched to this run's v/<run>/

Every input row ends in exactly one place: a split, ``rejects/`` with a reason, or (for exact
duplicates, also kept in ``rejects/`` with reason ``duplicate``) counted as a duplicate.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any

from dl_pipeline import dataset, features, fsutil, prepare_tasks
from dl_pipeline.config import Config, DataConfig, ShardConfig
from dl_pipeline.errors import PipelineError, UserError
from dl_pipeline.line_splits import BrokenFile, lines_before
from dl_pipeline.prepare_tasks import PrepareTask
from dl_pipeline.sources import estimate_rows, is_line_mode, read_raw
from dl_pipeline.spark import hadoop_delete, hadoop_path
from dl_pipeline.testhooks import wait_to_be_killed

log = logging.getLogger(__name__)

REJECTS_SCHEMA = prepare_tasks.rejects_schema()


# ---------------------------------------------------------------------------------------------
# Counting and checking
# ---------------------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """Aggregate rows of (status, reason, split, label, n) into the manifest's counts."""
    counts = {"input_rows": 0, "clean_rows": 0, "rejected_rows": 0, "duplicate_rows": 0, "splits": {}}
    by_reason: dict[str, int] = {}
    per_class = {s: [0] * num_classes for s in dataset.SPLITS}
    for r in rows:
        n = int(r["n"])
        counts["input_rows"] += n
        if r["status"] == "ok":
            counts["clean_rows"] += n
            per_class[r["split"]][int(r["label"])] += n
        elif r["status"] == "duplicate":
            counts["duplicate_rows"] += n
        else:
            counts["rejected_rows"] += n
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + n
    counts["splits"] = {s: sum(per_class[s]) for s in dataset.SPLITS}
    return {"counts": counts, "rejects_by_reason": dict(sorted(by_reason.items())), "per_class": per_class}


def check_accounting(counts: dict[str, Any]) -> None:
    c = counts
    if c["input_rows"] != c["clean_rows"] + c["rejected_rows"] + c["duplicate_rows"]:
        raise PipelineError(f"row accounting broken: {json.dumps(c)}")
    if c["clean_rows"] != sum(c["splits"].values()):
        raise PipelineError(f"split counts do not add up to clean rows: {json.dumps(c)}")


# ---------------------------------------------------------------------------------------------
# Writing the splits
# ---------------------------------------------------------------------------------------------


def choose_row_groups(n_rows: int, spec: dict[str, Any], shard: ShardConfig) -> int:
    """At least ``max_workers * row_groups_per_worker`` row groups, none above ``row_group_mb``."""
    if n_rows == 0:
        return 0
    by_size = math.ceil(n_rows * dataset.bytes_per_row(spec) / (shard.row_group_mb << 20))
    return max(1, min(n_rows, max(shard.max_workers * shard.row_groups_per_worker, by_size)))


INJECT_FAILURE_CONF = "spark.dl_pipeline.test.inject_prepare_failure"
PAUSE_CONF = "spark.dl_pipeline.test.pause_dir"  # test hook: see prepare_tasks.write_groups
FLUSH_CONF = "spark.dl_pipeline.test.spill_flush_bytes"  # test hook: see prepare_tasks.Spill


def _drop_attempt_leftovers(spark, url: str) -> None:
    """Delete the hidden temporary files that failed task attempts left in the folder ``url``."""
    fs, path = hadoop_path(spark, url)
    if not fs.exists(path):
        return
    for status in fs.listStatus(path):
        name = status.getPath().getName()
        if name.startswith(".") and name.endswith(".tmp"):
            fs.delete(status.getPath(), False)


def spill(spark, data: DataConfig, task: PrepareTask, splits: list[tuple[Any, str]] | None,
          raw) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pass 1 (prepare_tasks.Spill): -> (the spill tasks' report rows, the number to add to the
    row numbers in each spill file). ``splits``: (line split, origin) pairs the tasks read
    themselves, each numbering its rows from its first line; else ``raw``, the frame Spark read."""
    from dl_pipeline.score_tasks import run_tasks

    if splits is None:
        return [r.asDict() for r in raw.mapInArrow(prepare_tasks.spill_frame(task), prepare_tasks.REPORT_DDL).collect()], {}

    def run(i: int) -> list[dict[str, Any]]:
        return prepare_tasks.spill_lines(splits[i][0], splits[i][1], i, task)

    report = run_tasks(spark, len(splits), run)
    broken = sorted(r["reason"] for r in report if r["kind"] == "broken")
    if broken:
        raise BrokenFile(broken[0])
    lines = {r["batch"]: r["n"] for r in report if r["kind"] == "lines"}
    before = lines_before([split for split, _ in splits], [lines[i] for i in range(len(splits))])
    offsets = {}
    for i, n in enumerate(before):
        offsets[prepare_tasks.spill_name(i)] = offsets[prepare_tasks.rejects_name(i)] = n
    return report, offsets


# Write tasks per core, each a share of the row groups: more than one, so the scheduler evens
# out a slow core or a long task (with one task per core, the pass waits for the slower one);
# a task costs little more than opening the spill files again.
WRITE_TASKS_PER_CORE = 4


def write_outputs(spark, spilled: list[dict[str, Any]], offsets: dict[str, int], task: PrepareTask,
                  train_path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Pass 2 (prepare_tasks.write_groups): the row groups, and the spill tasks' rejects to
    publish, shared among WRITE_TASKS_PER_CORE tasks per core, then the counts summed and
    checked -> (summary of counts, split info). ``offsets``: ``spill``'s. Raises if the rows do
    not add up; nothing is published then (``task.root`` is this run's own directory)."""
    from dl_pipeline.score_tasks import run_tasks

    sources: dict[int, list[tuple[str, int]]] = {}
    for r in sorted((r for r in spilled if r["kind"] == "spill"), key=lambda r: (r["grp"], r["file"], r["batch"])):
        sources.setdefault(r["grp"], []).append((r["file"], r["batch"]))
    groups = sorted(sources)
    rejected = sorted(r["file"] for r in spilled if r["kind"] == "rejects")
    tasks = max(1, min(WRITE_TASKS_PER_CORE * spark.sparkContext.defaultParallelism, len(groups)))
    shares = [prepare_tasks.WriteShare(tuple(groups[i::tasks]), {g: sources[g] for g in groups[i::tasks]},
                                       tuple(rejected[i::tasks]), offsets) for i in range(tasks)]

    def run(i: int) -> list[dict[str, Any]]:
        return prepare_tasks.write_groups(i, shares[i], task)

    try:
        written = run_tasks(spark, tasks, run) if groups or rejected else []
    finally:  # the spill is only read here: gone whether or not the groups were written
        hadoop_delete(spark, fsutil.join(task.root, prepare_tasks.SPILL_DIR))
    counts = [r for r in spilled + written if r["kind"] == "count"]
    summary = summarize(counts, task.num_classes)
    check_accounting(summary["counts"])
    spilled_rows = sum(r["n"] for r in spilled if r["kind"] == "spill")
    decided = sum(r["n"] for r in written if r["kind"] == "count")
    if spilled_rows != decided:
        raise PipelineError(f"{task.root}: {spilled_rows} rows were spilled, {decided} came out of the writers")
    keys = [(w["split"], w["grp"]) for w in written if w["kind"] == "file"]
    if len(keys) != len(set(keys)):  # a group split across tasks: never silently
        raise PipelineError(f"{task.root}: a row group was written by more than one task: {sorted(keys)}")
    root = task.root
    for name in ("rejects", *dataset.SPLITS):
        _drop_attempt_leftovers(spark, fsutil.join(root, name))

    if summary["counts"]["splits"]["train"] == 0:  # not published: the previous output stays current
        for split in dataset.SPLITS:
            hadoop_delete(spark, fsutil.join(root, split))
        raise UserError(f"{train_path}: no usable training rows ({json.dumps(summary['rejects_by_reason'])}); "
                        f"nothing was published, this run's rejects are in {root}/rejects")
    if not fsutil.exists(fsutil.join(root, "rejects")):  # no rejects: still a (empty) table, so readers need no special case
        dataset.write_row_group(fsutil.join(root, "rejects", "part-00000.parquet"), REJECTS_SCHEMA.empty_table())

    schema = dataset.arrow_schema(task.spec)
    splits = {}
    for split in dataset.SPLITS:
        url = fsutil.join(root, split)
        if split not in {k[0] for k in keys}:  # no rows: no dataset (and the manifest says so)
            splits[split] = {"rows": 0, "row_groups": 0, "rows_per_row_group": [], "files": [], "per_class": summary["per_class"][split]}
            continue
        files = dataset.finalize_split(url, schema)
        splits[split] = {
            "rows": sum(f["rows"] for f in files),
            "row_groups": sum(f["row_groups"] for f in files),
            "rows_per_row_group": [f["rows"] for f in files],
            "files": [f["file"] for f in files],
            "per_class": summary["per_class"][split],
        }
        if splits[split]["rows"] != summary["counts"]["splits"][split]:
            raise PipelineError(f"{url}: wrote {splits[split]['rows']} rows, counted {summary['counts']['splits'][split]}")
    return summary, splits


PUBLISH_PAUSE_CONF = "spark.dl_pipeline.test.publish_pause_dir"  # test hook: see publish
LEGACY_OUTPUTS = ("train", "val", "test", "rejects", "_staging")  # where runs wrote before v/<run>/


def new_run_root() -> str:
    """``v/<UTC time>-<random>``: a directory no other run uses, sorted by start time."""
    import uuid

    return f"v/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def publish(spark, out: str, manifest: dict[str, Any]) -> None:
    """Make ``manifest`` (whose ``root`` names this run's directory) the dataset at ``out``.

    The switch is one atomic replace of ``manifest.json``: a crash before it leaves the previous
    dataset current and whole, a crash after it the new one. Then run directories other than
    this one and the one it replaces are deleted (crashed runs, older datasets), and so are the
    outputs of the layout before run directories once they are no longer the one replaced.
    """
    pause = spark.conf.get(PUBLISH_PAUSE_CONF, "")
    if pause:  # test hook: the driver waits here, everything written, to be killed
        wait_to_be_killed(pause)
    url = fsutil.join(out, dataset.MANIFEST)
    previous = json.loads(fsutil.read_text(url)).get("root") if fsutil.exists(url) else None
    manifest["previous_root"] = previous
    fsutil.write_text_atomic(url, json.dumps(manifest, indent=2, sort_keys=True))
    keep = {manifest["root"], previous}
    fs, path = hadoop_path(spark, fsutil.join(out, "v"))
    for status in fs.listStatus(path) if fs.exists(path) else []:
        if f"v/{status.getPath().getName()}" not in keep:
            fs.delete(status.getPath(), True)
    if previous is not None:  # one publish after the switch from the old layout, as for a previous run dir
        for name in LEGACY_OUTPUTS:
            hadoop_delete(spark, fsutil.join(out, name))


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def _label_map(spark, raw, data: DataConfig) -> tuple[tuple[str, ...] | None, list[str], int]:
    """(class names labels index for image folders or None, label names, K)."""
    if data.kind == "image_folder":
        from pyspark.sql import functions as F

        names = sorted(r[0] for r in raw.select(F.trim("label_raw")).distinct().collect() if r[0])
        if not names:
            raise UserError(f"{data.train_path}: no class sub-folders with .png/.jpg images found")
        return tuple(names), names, len(names)
    k = data.num_classes or len(data.label_names)
    if k == 0:
        raise UserError("data.num_classes is not set: set it (e.g. 4 for AG News) so labels outside 1..K are rejected")
    names = list(data.label_names) or [str(data.label_base + i) for i in range(k)]
    return None, names, k


def _input_files(data: DataConfig) -> list[tuple[str, str]]:
    """The input files the manifest records: (config key, URL) each."""
    out = []
    for key in ("train_path", "test_path", "train_labels_path", "test_labels_path"):
        path = getattr(data, key)
        if path and data.kind != "image_folder":  # thousands of images: the folder, not each file, is the input
            out += [(f"data.{key}", url) for url in fsutil.expand(path)]
    return out


class _Checksums:
    """The manifest's ``inputs`` (size and SHA-256 of each (config key, URL)), computed in a
    thread beside the passes (hashlib lets go of the GIL): read from the start, they held both
    cores idle 2.4-3.4 s at 10M rows (2.5 GB), one core reading. A daemon thread, stopped when
    the run fails, so a failed run neither waits for it nor exits later for it."""

    def __init__(self, files: list[tuple[str, str]]):
        self.files, self.stop = files, threading.Event()
        self.inputs: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="checksums", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t0 = time.time()
        try:
            for key, url in self.files:
                digest, size = fsutil.sha256_and_size(url, self.stop)
                self.inputs.append({"key": key, "url": url, "bytes": size, "sha256": digest})
        except BaseException as exc:  # handed to result()
            self.error = exc
        self.seconds = round(time.time() - t0, 3)

    def __enter__(self) -> _Checksums:
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()  # a failed run: stop reading (a finished thread ignores it)

    def result(self) -> tuple[list[dict[str, Any]], float]:
        """-> (inputs, seconds the checksums took); raises what the thread raised."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.inputs, self.seconds


# Byte ranges are no smaller than this (Spark's reader: spark.sql.files.openCostInBytes): a
# record whose quoted field holds line breaks is read whole only inside one range, so a small
# file is one range, as Spark reads it, on any number of cores.
MIN_SPLIT_BYTES = 4 << 20


def own_io_splits(data: DataConfig, io: str, cores: int) -> list[tuple[Any, str]] | None:
    """(line split, origin) pairs for spill tasks that read the inputs themselves
    (``prepare.io``: line-mode Zhang CSV on a filesystem Python reads, named as Spark's
    reader would list them), else None: Spark's readers then read them."""
    from dl_pipeline.line_splits import plan
    from dl_pipeline.score_tasks import MAX_SPLIT_BYTES, gzip_holds_up_the_cores, input_files, spark_file_urls

    if io == "spark":
        return None
    paths = [(origin, p) for origin, p in (("train", data.train_path), ("test", data.test_path)) if p]
    why = None if data.kind == "text" and is_line_mode(data) else "it reads line-mode Zhang CSV only (data.format: zhang_csv, UTF-8, data.multiline: false)"
    if why is None and io == "auto" and not all(fsutil.local_path(p) for _, p in paths):
        return None
    origins: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for origin, path in paths if why is None else []:
        why = fsutil.filesystem_error(path)
        if why:
            break
        fs, fs_path = fsutil.fs_and_path(fsutil.to_url(path))
        files, why = input_files(fs, fs_path)
        if why:
            break
        if not files:
            raise UserError(f"data.{origin}_path={path}: no such file or directory; fix the path (Hadoop URIs like s3a:// work too)")
        for f, url in zip(files, spark_file_urls(path, files), strict=True):
            if url in origins:  # Spark's reader reads it twice, once for each origin
                why = f"{url} is in both data.train_path and data.test_path"
                break
            origins[url], sizes[url] = origin, fs.size(f)
        if why:
            break
    if why is None and io == "auto":
        fs, _ = fsutil.fs_and_path(fsutil.to_url(paths[0][1]))
        if gzip_holds_up_the_cores(fs, [fsutil.fs_and_path(u)[1] for u in origins], cores):
            return None
    if why is not None:
        if io == "python":
            raise UserError(f"prepare.io=python: {why}; set prepare.io=auto")
        return None
    return [(split, origins[split.url]) for split in plan(sizes, 2 * cores, MAX_SPLIT_BYTES, MIN_SPLIT_BYTES)]


def prepare_dataset(spark, cfg: Config) -> dict[str, Any]:
    """Run the prepare stage; returns the manifest (also written to ``prepare.output_path``)."""
    if not cfg.prepare.output_path:
        raise UserError("prepare.output_path is not set: pass --set prepare.output_path=DIR")
    out = fsutil.to_url(cfg.prepare.output_path)
    problem = fsutil.filesystem_error(out)
    if problem:  # executors write the shards from Python: fail before any work, not in a task
        raise UserError(f"prepare.output_path={cfg.prepare.output_path}: Python cannot write there ({problem}); "
                        "install the filesystem's fsspec package (s3fs, gcsfs) on the driver and executors")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # One run per output at a time: two runs would each publish, and retire the other's directory.
    with fsutil.exclusive_lock(fsutil.join(out, "_prepare.lock"), {"started": started}, f"prepare into {out}"), \
            _Checksums(_input_files(cfg.data)) as checksums:
        return _prepare(spark, cfg, out, checksums)


def _refused(exc: BrokenFile) -> UserError:
    return UserError(f"{exc}: deliver it again or move it out of the input; nothing was published")


def _prepare(spark, cfg: Config, out: str, checksums: _Checksums) -> dict[str, Any]:
    data, spec = cfg.data, (features.text_spec(cfg.features, cfg.data) if cfg.data.kind == "text" else features.image_spec(cfg.data))
    if not data.train_path:
        raise UserError("data.train_path is not set: pass --set data.train_path=... or set it in the config file")
    timings: dict[str, float] = {}
    t0 = time.time()
    t = time.time()
    splits = own_io_splits(data, cfg.prepare.io, spark.sparkContext.defaultParallelism)
    raw = read_raw(spark, data) if splits is None else None
    class_names, label_names, k = _label_map(spark, raw, data)
    # Row groups are fixed before the data is read, from an estimate of the input rows that leans high.
    try:
        n_est = estimate_rows(data)
    except BrokenFile as exc:
        raise _refused(exc) from None
    groups = max(1, choose_row_groups(n_est, spec, cfg.shard))
    root = new_run_root()
    task = PrepareTask(
        root=fsutil.join(out, root), spec=spec, groups=groups, seed=cfg.shard.seed, val_fraction=cfg.shard.val_fraction,
        test_cut=0.0 if data.test_path else cfg.shard.test_fraction, num_classes=k, label_base=data.label_base,
        class_names=class_names, num_fields=data.num_fields, separator=data.title_separator, max_chars=data.max_text_chars,
        reject_invalid_utf8=data.invalid_utf8 == "reject",
        inject_failure=spark.conf.get(INJECT_FAILURE_CONF, "false") == "true", pause_dir=spark.conf.get(PAUSE_CONF, ""),
        **({"flush_bytes": int(spark.conf.get(FLUSH_CONF))} if spark.conf.get(FLUSH_CONF, "") else {}))
    try:
        spilled, offsets = spill(spark, data, task, splits, raw)
    except BaseException as exc:  # what the spill tasks wrote is no use to anyone
        hadoop_delete(spark, fsutil.join(task.root, prepare_tasks.SPILL_DIR))
        if isinstance(exc, BrokenFile):
            raise _refused(exc) from None
        raise
    timings["spill_s"] = round(time.time() - t, 3)
    summary, split_info = write_outputs(spark, spilled, offsets, task, data.train_path)
    timings["read_clean_write_s"] = round(time.time() - t, 3)
    log.info("prepare counts: %s (%d row groups, estimated %d input rows; inputs read by %s)", json.dumps(summary["counts"]),
             groups, n_est, "Spark" if splits is None else "prepare's tasks")

    inputs, timings["checksum_inputs_s"] = checksums.result()
    timings["total_s"] = round(time.time() - t0, 3)
    manifest = {
        "format": dataset.FORMAT,
        "row_rules": prepare_tasks.ROW_RULES,
        "root": root,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts": summary["counts"],
        "rejects_by_reason": summary["rejects_by_reason"],
        "splits": split_info,
        "num_classes": k,
        "label_base": data.label_base if class_names is None else 0,
        "label_names": label_names,
        "featurizer": spec,
        "schema": dataset.feature_shapes(spec),
        "max_workers": cfg.shard.max_workers,
        "inputs": inputs,
        "spark_version": spark.version,
        "timings": timings,
        "config": cfg.to_dict(),
    }
    publish(spark, out, manifest)
    log.info("prepare wrote %s (%s) in %.1fs", out, root, timings["total_s"])
    return manifest
