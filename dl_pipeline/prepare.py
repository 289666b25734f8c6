"""prepare: raw datasets -> cleaned, featurized, sharded Petastorm datasets plus a manifest.

Pipeline (each step a ``DataFrame -> DataFrame`` transform)::

    read_raw -> parse_labels -> clean_content -> resolve_duplicates -> assign_splits
             -> persist -> counts (accounting identity checked) -> rejects/ + train/ val/ test/

Every input row ends in exactly one place: a split, ``rejects/`` with a reason, or (for exact
duplicates, also kept in ``rejects/`` with reason ``duplicate``) counted as a duplicate.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Iterator

import numpy as np
import pandas as pd

from dl_pipeline import dataset, features, fsutil
from dl_pipeline.config import Config, DataConfig, ShardConfig
from dl_pipeline.errors import PipelineError, UserError
from dl_pipeline.sources import read_raw

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

    Adds ``text`` (string, null for images) and ``h`` (64-bit content hash of text or pixels).
    """
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    separator = data.title_separator

    @pandas_udf("string")
    def clean_udf(parts: pd.Series) -> pd.Series:
        return pd.Series([None if p is None else features.clean_record(p, separator) for p in parts], dtype=object)

    def transform(df):
        if data.kind != "text":
            return df.withColumn("text", F.lit(None).cast("string")).withColumn(
                "h", F.when(F.col("content").isNotNull(), F.xxhash64("content"))
            )
        total_len = F.aggregate(F.col("parts"), F.lit(0), lambda acc, x: acc + F.coalesce(F.length(x), F.lit(0)))
        bad_utf8 = F.exists(F.col("parts"), lambda x: F.instr(x, "\ufffd") > 0)
        reason = F.col("reason")
        if data.invalid_utf8 == "reject":
            reason = F.coalesce(reason, F.when(bad_utf8, F.lit("invalid_utf8")))
        reason = F.coalesce(reason, F.when(total_len > data.max_text_chars, F.lit("text_too_long")))
        df = df.withColumn("reason", reason)
        df = df.withColumn("text", clean_udf(F.when(F.col("reason").isNull(), F.col("parts"))))
        df = df.withColumn(
            "reason",
            F.coalesce("reason", F.when(F.col("text").isNull() | (F.length("text") == 0), F.lit("empty_text"))),
        )
        return df.withColumn("h", F.when(F.col("reason").isNull(), F.xxhash64("text")))

    return transform


def resolve_duplicates(df):
    """Same content with different labels -> all rejected (``conflicting_labels``); exact
    duplicates -> the first (by file, row number) kept, the rest marked ``duplicate``.

    Decided per origin: a training row that also appears in the test file stays in both, the
    test file is the benchmark's and must keep all its rows. One window pass over all rows (a
    union of filtered branches would read and clean the input twice); already-rejected rows
    get a key of their own so they neither group together nor skew one task.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ok = F.col("reason").isNull()
    group = F.when(ok, F.col("h")).otherwise(F.xxhash64("source_file", "row_number", "raw"))
    df = df.withColumn("_g", group)
    key = Window.partitionBy("origin", "_g")
    ordered = key.orderBy(F.col("source_file"), F.col("row_number").asc_nulls_last(), F.col("raw"))
    conflict = F.min("label").over(key) != F.max("label").over(key)
    first = F.row_number().over(ordered) == 1
    reason = F.when(ok & conflict, F.lit("conflicting_labels")).when(ok & ~first, F.lit("duplicate")).otherwise(F.col("reason"))
    # Clean rows no longer need their raw record or split-out fields: keep the cache small.
    return (
        df.withColumn("reason", reason)
        .withColumn("raw", F.when(F.col("reason").isNotNull(), F.col("raw")))
        .drop("_g", "parts")
    )


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
# Writing Petastorm splits
# ---------------------------------------------------------------------------------------------


def choose_row_groups(n_rows: int, spec: dict[str, Any], shard: ShardConfig) -> int:
    """At least ``max_workers * row_groups_per_worker`` row groups, none above ``row_group_mb``."""
    if n_rows == 0:
        return 0
    by_size = math.ceil(n_rows * dataset.bytes_per_row(spec) / (shard.row_group_mb << 20))
    return max(1, min(n_rows, max(shard.max_workers * shard.row_groups_per_worker, by_size)))


def _partition_keys(spark, n: int) -> list[int]:
    """For g in 0..n-1 a long whose Spark hash partition (pmod(murmur3, n)) is exactly g.

    ``repartition(n, col)`` then sends every row with key_g to partition g, one file each:
    hash partitioning of 0..n-1 themselves would collide.
    """
    from pyspark.sql import functions as F

    rows = (
        spark.range(0, 64 * n)
        .select("id", F.pmod(F.hash("id"), F.lit(n)).alias("g"))
        .groupBy("g")
        .agg(F.min("id").alias("id"))
        .collect()
    )
    keys = {r["g"]: r["id"] for r in rows}
    if len(keys) != n:  # pragma: no cover - probability ~ n * exp(-64)
        raise PipelineError("could not find partition keys")
    return [keys[g] for g in range(n)]


def _featurize_fn(spec: dict[str, Any], field_names: list[str]):
    """mapInPandas body: (row_id, label, text|content) -> Petastorm-encoded columns."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            out = {"row_id": pdf["row_id"], "label": pdf["label"].astype(np.int32)}
            if spec["kind"] == "text":
                feats = features.featurize_texts(pdf["text"].tolist(), spec)
                for name in ("chars", "tokens"):
                    if name in feats:
                        out[name] = features.ndarray_codec_bytes(feats[name])
                if "length" in feats:
                    out["length"] = feats["length"]
            else:
                im = spec["image"]
                shape = (im["height"], im["width"], im["channels"])
                pixels = np.stack([np.frombuffer(b, np.uint8).reshape(shape) for b in pdf["content"]]) if len(pdf) else np.zeros((0, *shape), np.uint8)
                out["image"] = features.ndarray_codec_bytes(pixels)
            yield pd.DataFrame(out)[field_names]

    return run


def _rename_parts(spark, url: str) -> list[str]:
    """part-00003-<uuid>-c000.snappy.parquet -> part-00003.parquet (stable names across runs)."""
    jvm = spark._jvm
    path = jvm.org.apache.hadoop.fs.Path(url)
    fs = path.getFileSystem(spark._jsc.hadoopConfiguration())
    names = []
    for st in fs.listStatus(path):
        name = st.getPath().getName()
        if name.startswith("part-") and name.endswith(".parquet"):
            new = f"part-{int(name[5:10]):05d}.parquet"
            fs.rename(st.getPath(), jvm.org.apache.hadoop.fs.Path(path, new))
            names.append(new)
        elif name == "_SUCCESS":
            fs.delete(st.getPath(), False)
    return sorted(names)


def write_split(spark, df, url: str, n_rows: int, spec: dict[str, Any], shard: ShardConfig, salt: int) -> dict[str, Any]:
    """Write one split as a Petastorm dataset with ``G`` near-equal row groups, one per file.

    Rows get a seeded pseudo-random order key; a global index over that order (bucketed so no
    single task sorts everything) is dealt round-robin to G groups, so group sizes differ by at
    most one row and every group mixes classes. Re-running gives byte-identical files.
    """
    from petastorm.etl.dataset_metadata import materialize_dataset
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    schema = dataset.make_schema(spec)
    g = choose_row_groups(n_rows, spec, shard)
    if g == 0:
        return {"rows": 0, "row_groups": 0, "rows_per_row_group": [], "files": []}
    k = F.xxhash64(F.col("h"), F.lit(shard.seed + salt))
    keyed = df.withColumn("_k", k).withColumn("_b", F.pmod(F.col("_k"), F.lit(g)))
    bucket_sizes = {r["_b"]: r["count"] for r in keyed.groupBy("_b").count().collect()}
    offsets, acc = [], 0
    for b in range(g):
        offsets.append(acc)
        acc += bucket_sizes.get(b, 0)
    if acc != n_rows:
        raise PipelineError(f"{url}: expected {n_rows} rows, found {acc}")
    pkeys = _partition_keys(spark, g)
    rn = F.row_number().over(Window.partitionBy("_b").orderBy("_k", "h"))
    gi = F.element_at(F.array(*[F.lit(o) for o in offsets]), F.col("_b").cast("int") + 1) + rn - 1
    rg = F.pmod(gi, F.lit(g))
    laid_out = (
        keyed.withColumn("_rg", rg)
        .withColumn("_pk", F.element_at(F.array(*[F.lit(p).cast("long") for p in pkeys]), F.col("_rg").cast("int") + 1))
        .repartition(g, "_pk")
        .sortWithinPartitions("_k", "h")
        .select(F.lower(F.hex("h")).alias("row_id"), "label", "text", "content")
    )
    names = [f.name for f in schema.fields.values()]
    encoded = laid_out.mapInPandas(_featurize_fn(spec, names), schema.as_spark_schema())
    rg_bytes = math.ceil(n_rows / g) * dataset.bytes_per_row(spec)
    # One row group per file: the Parquet block size is set well above a group's size.
    block_mb = max(8, 4 * math.ceil(rg_bytes / (1 << 20)))
    with materialize_dataset(spark, url, schema, row_group_size_mb=block_mb):
        encoded.write.mode("overwrite").parquet(url)
        files = _rename_parts(spark, url)
    base, extra = divmod(n_rows, g)
    return {
        "rows": n_rows,
        "row_groups": g,
        "rows_per_row_group": [base + (1 if i < extra else 0) for i in range(g)],
        "files": files,
    }


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


def prepare_dataset(spark, cfg: Config) -> dict[str, Any]:
    """Run the prepare stage; returns the manifest (also written to ``prepare.output_path``)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    if not cfg.prepare.output_path:
        raise UserError("prepare.output_path is not set: pass --set prepare.output_path=DIR")
    out = fsutil.to_url(cfg.prepare.output_path)
    data, spec = cfg.data, (features.text_spec(cfg.features, cfg.data) if cfg.data.kind == "text" else features.image_spec(cfg.data))
    timings: dict[str, float] = {}
    t0 = time.time()
    inputs = _input_files(data)
    timings["checksum_inputs_s"] = round(time.time() - t0, 3)

    t = time.time()
    raw = read_raw(spark, data)
    label_index, label_names, k = _label_map(spark, raw, data)
    resolved = (
        raw.transform(parse_labels(label_index, data.label_base, k))
        .transform(clean_content(data))
        .transform(resolve_duplicates)
        .transform(assign_splits(cfg.shard, bool(data.test_path)))
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    try:
        rows = resolved.groupBy("status", "reason", "split", "label").agg(F.count(F.lit(1)).alias("n")).collect()
        summary = summarize([r.asDict() for r in rows], k)
        check_accounting(summary["counts"])
        timings["read_clean_count_s"] = round(time.time() - t, 3)
        log.info("prepare counts: %s", json.dumps(summary["counts"]))
        if summary["counts"]["splits"]["train"] == 0:
            raise UserError(f"{data.train_path}: no usable training rows ({json.dumps(summary['rejects_by_reason'])}); see {out}/rejects")

        t = time.time()
        rejects = resolved.filter(F.col("status") != "ok").select(
            "origin",
            "source_file",
            "row_number",
            F.substring(F.col("raw"), 1, RAW_LIMIT).alias("raw"),
            "reason",
        )
        rejects_url = fsutil.join(out, "rejects")
        rejects.orderBy("source_file", "row_number", "raw").coalesce(1).write.mode("overwrite").parquet(rejects_url)
        _rename_parts(spark, rejects_url)
        timings["write_rejects_s"] = round(time.time() - t, 3)

        splits = {}
        for salt, split in enumerate(dataset.SPLITS, start=1):
            t = time.time()
            part = resolved.filter((F.col("status") == "ok") & (F.col("split") == split)).select("h", "label", "text", "content")
            splits[split] = write_split(spark, part, fsutil.join(out, split), summary["counts"]["splits"][split], spec, cfg.shard, salt)
            splits[split]["per_class"] = summary["per_class"][split]
            timings[f"write_{split}_s"] = round(time.time() - t, 3)
    finally:
        resolved.unpersist()

    timings["total_s"] = round(time.time() - t0, 3)
    schema = dataset.make_schema(spec)
    manifest = {
        "format": "dl_pipeline.prepared/1",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts": summary["counts"],
        "rejects_by_reason": summary["rejects_by_reason"],
        "splits": splits,
        "num_classes": k,
        "label_base": data.label_base if label_index is None else 0,
        "label_names": label_names,
        "featurizer": spec,
        "schema": {f.name: {"dtype": np.dtype(f.numpy_dtype).name if f.numpy_dtype is not np.str_ else "str", "shape": list(f.shape)} for f in schema.fields.values()},
        "max_workers": cfg.shard.max_workers,
        "inputs": inputs,
        "spark_version": spark.version,
        "timings": timings,
        "config": cfg.to_dict(),
    }
    fsutil.write_text_atomic(fsutil.join(out, dataset.MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
    log.info("prepare wrote %s in %.1fs", out, timings["total_s"])
    return manifest
