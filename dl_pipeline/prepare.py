"""prepare: raw datasets -> cleaned, featurized, sharded typed-Parquet datasets (read with Petastorm) plus a manifest.

Pipeline (each step a ``DataFrame -> DataFrame`` transform)::

    read_raw -> parse_labels -> clean_content -> resolve_duplicates (the one shuffle) -> assign_splits
             -> write_outputs: featurize, count, write rejects/ + train/ val/ test/ (one job, no cache)
             -> accounting identity checked -> publish: manifest.json switched to this run's v/<run>/

Every input row ends in exactly one place: a split, ``rejects/`` with a reason, or (for exact
duplicates, also kept in ``rejects/`` with reason ``duplicate``) counted as a duplicate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dl_pipeline import dataset, features, fsutil
from dl_pipeline.config import Config, DataConfig, ShardConfig
from dl_pipeline.errors import PipelineError, UserError
from dl_pipeline.sources import estimate_rows, read_raw
from dl_pipeline.spark import hadoop_delete, hadoop_path
from dl_pipeline.testhooks import wait_to_be_killed

log = logging.getLogger(__name__)

RAW_LIMIT = 4096  # bytes of the raw record kept in rejects/


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


def parse_labels(label_index: dict[str, int] | None, base: int, num_classes: int):
    """label_raw -> 0-based ``label``; rejects non-integers and labels outside base..base+K-1.

    With ``label_index`` (image folders) the raw label is a class name looked up in it.
    """
    from pyspark.sql import functions as F

    def transform(df):
        raw = F.trim(F.col("label_raw"))
        if label_index is not None:
            mapping = F.create_map(*[x for k, v in sorted(label_index.items()) for x in (F.lit(k), F.lit(v))])
            label = mapping[raw]
            bad = F.when(label.isNull(), F.lit("label_unknown"))
        else:
            is_int = raw.rlike(r"^[+-]?[0-9]{1,9}$")
            value = F.when(is_int, raw.cast("int"))
            label = value - F.lit(base)
            bad = F.when(~is_int | raw.isNull(), F.lit("label_not_integer")).when(
                (label < 0) | (label >= num_classes), F.lit("label_out_of_range")
            )
        return df.withColumn("reason", F.coalesce("reason", bad)).withColumn(
            "label", F.when(F.col("reason").isNull(), label.cast("int"))
        )

    return transform


def clean_content(data: DataConfig):
    """Text: reject invalid UTF-8 / over-long rows, clean and join the fields, reject empties.

    Adds ``text`` (string, null for images) and ``h`` (64-bit content hash of text or pixels);
    drops ``parts``.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    separator, max_chars, reject_utf8 = data.title_separator, data.max_text_chars, data.invalid_utf8 == "reject"

    @pandas_udf("reason string, text string")
    def check_udf(parts: pd.Series) -> pd.DataFrame:
        checked = [features.check_record(None if p is None else list(p), separator, max_chars, reject_utf8) for p in parts]
        reasons, texts = zip(*checked, strict=True) if checked else ((), ())
        return pd.DataFrame({"reason": list(reasons), "text": list(texts)}, dtype=object)

    def transform(df):
        if data.kind != "text":
            return (
                df.withColumn("text", F.lit(None).cast("string"))
                .withColumn("h", F.when(F.col("content").isNotNull(), F.xxhash64("content")))
                .drop("parts")
            )
        if "text_reason" in df.columns:  # checked and cleaned while parsing (line-mode CSV)
            df = df.withColumn("reason", F.coalesce("reason", "text_reason")).drop("text_reason")
            df = df.withColumn("text", F.when(F.col("reason").isNull(), F.col("text")))
        else:  # fields split by Spark: the same rule set (features.check_record), on the rows not yet rejected
            checked = check_udf(F.col("parts"))
            df = df.withColumn("_c", F.when(F.col("reason").isNull(), checked))
            df = df.withColumn("reason", F.coalesce("reason", "_c.reason")).withColumn("text", F.col("_c.text")).drop("_c")
        df = df.withColumn(
            "reason",
            F.coalesce("reason", F.when(F.col("text").isNull() | (F.col("text") == ""), F.lit("empty_text"))),
        )
        # The split-out fields are not needed past here: dropped before the shuffle (~1/3 of it).
        return df.withColumn("h", F.when(F.col("reason").isNull(), F.xxhash64("text"))).drop("parts")

    return transform


def resolve_duplicates(num_row_groups: int, num_partitions: int, seed: int):
    """Same content with different labels -> all rejected (``conflicting_labels``); exact
    duplicates -> the first (by file, row number) kept, the rest marked ``duplicate``.

    Decided per origin: a training row that also appears in the test file stays in both, the
    test file is the benchmark's and must keep all its rows.

    The one shuffle of the job happens here: rows are hash-partitioned on ``_rg``, a seeded
    hash of the content, into ``num_partitions`` partitions, and get ``_group`` = the same hash
    modulo ``num_row_groups`` (a multiple of ``num_partitions``, so a group never spans two
    partitions). All copies of a text meet in one task, so the window needs no second
    exchange, and each group later becomes one row group of every split: groups are
    near-equal (binomial), mix classes, and a row's group depends on its content only.
    Already-rejected rows get a key of their own so they neither group together nor skew one
    task.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    def transform(df):
        ok = F.col("reason").isNull()
        group = F.when(ok, F.col("h")).otherwise(F.xxhash64("source_file", "row_number", "raw"))
        df = df.withColumn("_g", group).withColumn("_rg", F.xxhash64("_g", F.lit(seed)))
        # F.hash is the Murmur3 that HashPartitioning uses: pmod(hash, groups) mod partitions
        # is the partition id, since partitions divide groups.
        if num_row_groups % num_partitions:
            raise ValueError(f"{num_partitions} partitions do not divide {num_row_groups} row groups")
        df = df.withColumn("_group", F.pmod(F.hash("_rg"), F.lit(num_row_groups)))
        # _key: the group in the high bits, 40 bits of _rg below. Sorting on it leaves each row
        # group's rows together, in a seeded hash order of their content, which is all the
        # writer needs: no second sort. Sorting on _group first instead left ~N/groups rows
        # sharing each sort prefix, and every comparison went on to the full row.
        key = F.shiftleft(F.col("_group").cast("long"), 40).bitwiseOR(F.col("_rg").bitwiseAND(F.lit((1 << 40) - 1)))
        df = df.withColumn("_key", key).repartition(num_partitions, "_rg")
        # (_key, _rg, _g) rather than (_g): hash partitioning on _rg satisfies the window's
        # clustering, and _key and _rg are functions of _g, so the groups are the same.
        ordered = Window.partitionBy("_key", "_rg", "_g", "origin").orderBy(
            F.col("source_file"), F.col("row_number").asc_nulls_last(), F.col("raw"))
        # One partition and order spec for both windows: Spark then sorts the rows once, not
        # twice (an unordered window for min/max would be a second Window with its own Sort).
        whole = ordered.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
        conflict = F.min("label").over(whole) != F.max("label").over(whole)
        first = F.row_number().over(ordered) == 1
        reason = F.when(ok & conflict, F.lit("conflicting_labels")).when(ok & ~first, F.lit("duplicate")).otherwise(F.col("reason"))
        # Clean rows no longer need their raw record (only rejects keep it).
        return (
            df.withColumn("reason", reason)
            .withColumn("raw", F.when(F.col("reason").isNotNull(), F.col("raw")))
            .drop("_g", "_rg", "_key")
        )

    return transform


def assign_splits(shard: ShardConfig, has_test_file: bool):
    """Split as a function of the content hash and seed only: stable when rows are added."""
    from pyspark.sql import functions as F

    def transform(df):
        u = F.pmod(F.xxhash64(F.col("h"), F.lit(shard.seed)), F.lit(1_000_000)) / F.lit(1_000_000.0)
        test_cut = 0.0 if has_test_file else shard.test_fraction
        split = (
            F.when(F.col("origin") == "test", F.lit("test"))
            .when(u < test_cut, F.lit("test"))
            .when(u < test_cut + shard.val_fraction, F.lit("val"))
            .otherwise(F.lit("train"))
        )
        status = F.when(F.col("reason").isNull(), F.lit("ok")).when(F.col("reason") == "duplicate", F.lit("duplicate"))
        return df.withColumn("split", F.when(F.col("reason").isNull(), split)).withColumn(
            "status", F.coalesce(status, F.lit("rejected"))
        )

    return transform


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


def choose_layout(n_rows: int, spec: dict[str, Any], shard: ShardConfig, shuffle_partitions: int) -> tuple[int, int]:
    """(row groups, shuffle partitions): partitions divide groups; more groups than
    ``spark.sql.shuffle.partitions`` are rounded up to a multiple of it."""
    groups = max(1, choose_row_groups(n_rows, spec, shard))
    if groups <= shuffle_partitions:
        return groups, groups
    return math.ceil(groups / shuffle_partitions) * shuffle_partitions, shuffle_partitions


INJECT_FAILURE_CONF = "spark.dl_pipeline.test.inject_prepare_failure"
PAUSE_CONF = "spark.dl_pipeline.test.pause_dir"  # test hook: see _dataset_writer
REJECTS_SCHEMA = pa.schema([("origin", pa.string()), ("source_file", pa.string()), ("row_number", pa.int64()),
                            ("raw", pa.string()), ("reason", pa.string())])
_WRITER_OUTPUT = pa.schema([("kind", pa.string()), ("split", pa.string()), ("grp", pa.int32()), ("file", pa.string()),
                            ("status", pa.string()), ("reason", pa.string()), ("label", pa.int32()), ("n", pa.int64())])
_SPARK_TYPES = {pa.string(): "string", pa.int32(): "int", pa.int64(): "long"}
_WRITER_DDL = ", ".join(f"{f.name} {_SPARK_TYPES[f.type]}" for f in _WRITER_OUTPUT)


def _report(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    """Rows of _WRITER_OUTPUT, missing fields null."""
    return pa.RecordBatch.from_pylist(rows, schema=_WRITER_OUTPUT)


# The keys are statuses, reason codes, split names and label numbers: never NUL or US.
_NULL, _SEP = "\x00", "\x1f"


def _count_keys(batch: pa.RecordBatch) -> dict[tuple, int]:
    """{(status, reason, split, label): rows} of one batch, in vectorised Arrow kernels (an
    Acero group_by costs ~0.25 s a call here; this ~0.1 us a row)."""
    import pyarrow.compute as pc

    names = ("status", "reason", "split", "label")
    cols = [pc.fill_null(pc.cast(batch.column(n), pa.string()), _NULL) for n in names]
    out = {}
    for item in pc.value_counts(pc.binary_join_element_wise(*cols, _SEP)).to_pylist():
        status, reason, split, label = (None if v == _NULL else v for v in item["values"].split(_SEP))
        out[(status, reason, split, None if label is None else int(label))] = item["counts"]
    return out


def _dataset_writer(spec: dict[str, Any], root: str, arrow_schema, inject_failure: bool = False, pause_dir: str = ""):
    """The function ``mapInArrow`` runs on executors, once per task, over every row.

    Rows come with each row group's rows together (see resolve_duplicates), in a seeded order
    of their content. Writes, with pyarrow, under ``root`` (this run's directory):
      * ``<split>/part-<group>.parquet``: one file = one row group per (split, group);
      * ``rejects/part-<task>.parquet``: the task's rejected and duplicate rows.
    Yields ("file", split, group, name, rows) per file and ("count", status, reason, split,
    label, n) rows that the driver sums into the manifest's counts.

    Featurizing and writing in the same Python pass means the feature blobs (~2 KB a row) never
    travel back to the JVM, and counting here saves a pass over the data (and a cache of it).
    Arrow batches, not pandas: only the text column becomes Python objects. pyarrow's output
    depends on the rows alone: parquet-mr lists column encodings in identity-hash order, so the
    same rows written by two JVMs used to differ.

    Test hooks: ``inject_failure`` makes every task's first attempt raise after its first file;
    ``pause_dir`` makes task 0's first attempt, after its first file, write its pid there and
    wait (up to 60 s) for the test to kill it with a signal.
    """
    import pyarrow.compute as pc

    def write(batches):
        from pyspark import TaskContext

        with contextlib.ExitStack() as open_files:  # on an exception the rejects file is not published
            yield from _write(batches, TaskContext.get(), open_files)

    def _write(batches, context, open_files):
        # Test hook: every task's first attempt dies after it has written a file.
        fail_after_first_file = inject_failure and context.attemptNumber() == 0
        pending: dict[str, list[pa.RecordBatch]] = {}  # the current group's clean rows, by split
        pending_group = None
        counts: dict[tuple, int] = {}
        rejects = None  # this task's rejects file, opened at the first reject
        files = []

        def flush():
            for split, pieces in sorted(pending.items()):
                rows = pa.Table.from_batches(pieces)
                columns = features.encoded_features(rows.column("value"), spec)
                table = pa.table({"row_id": rows.column("row_id"), "label": rows.column("label"), **columns}, schema=arrow_schema)
                name = f"part-{pending_group:05d}.parquet"
                dataset.write_row_group(fsutil.join(root, split, name), table)
                files.append({"kind": "file", "split": split, "grp": pending_group, "file": name, "n": table.num_rows})
            pending.clear()

        for batch in batches:
            if not batch.num_rows:
                continue
            for key, n in _count_keys(batch).items():
                counts[key] = counts.get(key, 0) + n
            ok = pc.equal(batch.column("status"), "ok")
            if not pc.all(ok).as_py():
                if rejects is None:
                    url = fsutil.join(root, "rejects", f"part-{context.partitionId():05d}.parquet")
                    rejects = open_files.enter_context(dataset.parquet_file(url, REJECTS_SCHEMA, compression="snappy"))
                bad = batch.filter(pc.invert(ok))
                rejects.write_table(pa.table([bad.column(n) for n in REJECTS_SCHEMA.names], schema=REJECTS_SCHEMA))
                batch = batch.filter(ok)
            # Clean rows: cut the batch where the group changes; a new group flushes the last.
            group = batch.column("_group").to_numpy()
            bounds = [0, *(np.flatnonzero(group[1:] != group[:-1]) + 1), len(group)]
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                if lo == hi:
                    continue
                if pending_group is not None and group[lo] != pending_group:
                    flush()
                    if fail_after_first_file:
                        raise RuntimeError("injected prepare failure")
                    if pause_dir and context.partitionId() == 0 and context.attemptNumber() == 0:
                        wait_to_be_killed(pause_dir)
                pending_group = int(group[lo])
                piece = batch.slice(lo, hi - lo)
                split = piece.column("split")
                for name in pc.unique(split).to_pylist():
                    pending.setdefault(name, []).append(piece.filter(pc.equal(split, name)))
        flush()
        open_files.close()  # publishes the rejects file
        files += [{"kind": "count", "status": s, "reason": r, "split": p, "label": lab, "n": n} for (s, r, p, lab), n in counts.items()]
        yield _report(files)

    return write


def _drop_attempt_leftovers(spark, url: str) -> None:
    """Delete the hidden temporary files that failed task attempts left in the folder ``url``."""
    fs, path = hadoop_path(spark, url)
    if not fs.exists(path):
        return
    for status in fs.listStatus(path):
        name = status.getPath().getName()
        if name.startswith(".") and name.endswith(".tmp"):
            fs.delete(status.getPath(), False)


def write_outputs(spark, resolved, root: str, spec: dict[str, Any], num_partitions: int, num_classes: int,
                  train_path: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Write ``<root>/rejects`` and the datasets ``<root>/{train,val,test}`` in one Spark job;
    returns (summary of counts, split info). Raises if the rows do not add up.

    ``root`` is this run's own directory (see dataset: nothing reads it until the manifest
    names it). ``resolved`` is hash-partitioned so that every row group (``_group``, see
    resolve_duplicates) lies within one partition; partitions are coalesced into one Python
    task per core (fewer rejects files, and each task's fixed cost paid once per core), which
    writes its files (see _dataset_writer); the driver checks them against the counts. Rows
    inside a group are ordered by a seeded hash of their content: random and reproducible, so
    re-runs give byte-identical shards, on any cluster.
    """
    from pyspark.sql import functions as F

    schema = dataset.arrow_schema(spec)
    tasks = max(1, min(spark.sparkContext.defaultParallelism, num_partitions))
    ok = F.col("status") == "ok"
    rows = (
        resolved.select(
            "status", "reason", "split", "_group", "label", "origin", "source_file", "row_number",
            F.when(ok, F.lower(F.hex("h"))).alias("row_id"),
            F.when(ok, F.col("text") if spec["kind"] == "text" else F.col("content")).alias("value"),
            F.when(~ok, F.substring("raw", 1, RAW_LIMIT)).alias("raw"),
        )
        .coalesce(tasks)  # keeps each partition's order, so each group's rows stay together
    )
    writer = _dataset_writer(spec, root, schema, spark.conf.get(INJECT_FAILURE_CONF, "false") == "true",
                             spark.conf.get(PAUSE_CONF, ""))
    written = rows.mapInArrow(writer, _WRITER_DDL).collect()
    summary = summarize([r.asDict() for r in written if r["kind"] == "count"], num_classes)
    check_accounting(summary["counts"])
    keys = [(w["split"], w["grp"]) for w in written if w["kind"] == "file"]
    if len(keys) != len(set(keys)):  # a group split across tasks: never silently
        raise PipelineError(f"{root}: a row group was written by more than one task: {sorted(keys)}")
    for name in ("rejects", *dataset.SPLITS):
        _drop_attempt_leftovers(spark, fsutil.join(root, name))

    if summary["counts"]["splits"]["train"] == 0:  # not published: the previous output stays current
        for split in dataset.SPLITS:
            hadoop_delete(spark, fsutil.join(root, split))
        raise UserError(f"{train_path}: no usable training rows ({json.dumps(summary['rejects_by_reason'])}); "
                        f"nothing was published, this run's rejects are in {root}/rejects")
    if not fsutil.exists(fsutil.join(root, "rejects")):  # no rejects: still a (empty) table, so readers need no special case
        dataset.write_row_group(fsutil.join(root, "rejects", "part-00000.parquet"), REJECTS_SCHEMA.empty_table())

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


def _label_map(spark, raw, data: DataConfig) -> tuple[dict[str, int] | None, list[str], int]:
    """(class-name index for image folders or None, label names, K)."""
    if data.kind == "image_folder":
        from pyspark.sql import functions as F

        names = sorted(r[0] for r in raw.select(F.trim("label_raw")).distinct().collect() if r[0])
        if not names:
            raise UserError(f"{data.train_path}: no class sub-folders with .png/.jpg images found")
        return {n: i for i, n in enumerate(names)}, names, len(names)
    k = data.num_classes or len(data.label_names)
    if k == 0:
        raise UserError("data.num_classes is not set: set it (e.g. 4 for AG News) so labels outside 1..K are rejected")
    names = list(data.label_names) or [str(data.label_base + i) for i in range(k)]
    return None, names, k


def _input_files(data: DataConfig) -> list[dict[str, Any]]:
    out = []
    for key in ("train_path", "test_path", "train_labels_path", "test_labels_path"):
        path = getattr(data, key)
        if not path:
            continue
        for url in fsutil.expand(path):
            if data.kind == "image_folder":
                continue  # thousands of images: the folder, not each file, is the input
            digest, size = fsutil.sha256_and_size(url)
            out.append({"key": f"data.{key}", "url": url, "bytes": size, "sha256": digest})
    return out


def _shuffle_partitions(spark) -> int:
    """spark.sql.shuffle.partitions, or the cluster's cores where it is "auto" (Databricks)."""
    value = spark.conf.get("spark.sql.shuffle.partitions", "200")
    return int(value) if value.isdigit() else max(1, spark.sparkContext.defaultParallelism)


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
    with fsutil.exclusive_lock(fsutil.join(out, "_prepare.lock"), {"started": started}, f"prepare into {out}"):
        return _prepare(spark, cfg, out)


def _prepare(spark, cfg: Config, out: str) -> dict[str, Any]:
    data, spec = cfg.data, (features.text_spec(cfg.features, cfg.data) if cfg.data.kind == "text" else features.image_spec(cfg.data))
    timings: dict[str, float] = {}
    t0 = time.time()
    inputs = _input_files(data)
    timings["checksum_inputs_s"] = round(time.time() - t0, 3)

    t = time.time()
    raw = read_raw(spark, data)
    label_index, label_names, k = _label_map(spark, raw, data)
    # Row groups are fixed before the data is read (each lies within one partition of the one
    # shuffle), from an estimate of the input rows that leans high.
    n_est = estimate_rows(data)
    groups, partitions = choose_layout(n_est, spec, cfg.shard, _shuffle_partitions(spark))
    resolved = (
        raw.transform(parse_labels(label_index, data.label_base, k))
        .transform(clean_content(data))
        .transform(resolve_duplicates(groups, partitions, cfg.shard.seed))
        .transform(assign_splits(cfg.shard, bool(data.test_path)))
    )
    root = new_run_root()
    summary, splits = write_outputs(spark, resolved, fsutil.join(out, root), spec, partitions, k, data.train_path)
    timings["read_clean_write_s"] = round(time.time() - t, 3)
    log.info("prepare counts: %s (%d row groups, estimated %d input rows)", json.dumps(summary["counts"]), groups, n_est)

    timings["total_s"] = round(time.time() - t0, 3)
    manifest = {
        "format": dataset.FORMAT,
        "root": root,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts": summary["counts"],
        "rejects_by_reason": summary["rejects_by_reason"],
        "splits": splits,
        "num_classes": k,
        "label_base": data.label_base if label_index is None else 0,
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
