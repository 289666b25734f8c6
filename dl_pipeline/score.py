"""score: idempotent, scheduled batch scoring with a model bundle.

One run scores the rows of one date (``score.input_path`` may contain ``{date}``) and replaces
exactly the ``dt=<run_date>`` partition of ``score.output_path``. Bad rows never fail the job:
they go to ``_rejects/dt=<run_date>`` with a reason. Both are written in full under
``_staging/`` first and then moved into place as one journaled commit (``_commit``): a crash
before it leaves the date's previous result whole, a crash during it is finished by the next
run of the date. ``rows_in == scored + rejected`` is checked on every run before writing, ``rows_in``
counted from the input on its own.

The driver side lives here; what runs per batch of rows on executors (parse, clean, featurize,
predict, the output columns) is ``scoring``, shared by both ways of moving rows: Spark's readers
and writers here, or the tasks' own byte ranges (``score_tasks``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from typing import Any, Iterable, Iterator

import pandas as pd

from dl_pipeline import fsutil
from dl_pipeline.config import Config, DataConfig, ScoreConfig, replace
from dl_pipeline.errors import PipelineError, UserError
from dl_pipeline.scoring import scored_rows, worker_bundle
from dl_pipeline.spark import hadoop_delete, hadoop_path
from dl_pipeline.testhooks import wait_to_be_killed

log = logging.getLogger(__name__)

def run_date(score: ScoreConfig) -> str:
    if not score.run_date:
        return dt.datetime.now(dt.timezone.utc).date().isoformat()
    try:
        return dt.date.fromisoformat(score.run_date).isoformat()
    except ValueError:
        raise UserError(f"score.run_date={score.run_date!r}: expected YYYY-MM-DD, e.g. --run-date 2026-11-22") from None


def _read_input(spark, cfg: Config, path: str, kind: str):
    """-> (DataFrame(ids..., raw string[, parts array<string> | content binary, reason string]),
    ids, scan).

    Without ``parts`` or ``content`` the rows are raw Zhang CSV lines that _score_fn parses
    itself. ``scan`` is a plain file scan with the input's partitioning (planning it runs no
    job), or None.
    """
    from pyspark.sql import functions as F

    from dl_pipeline.sources import blank_line, is_line_mode, read_lines, read_text

    s = cfg.score
    if not fsutil.expand(path):
        raise UserError(f"score.input_path={path}: no such file or directory (for run date {s.run_date or 'today'}); fix the path or --run-date")
    if kind == "image":
        return _read_images(spark, s, path)
    if s.input_format == "zhang_csv":
        data = DataConfig(**{**cfg.data.__dict__, "format": "zhang_csv"})
        ids = list(s.id_columns) or ["source_file", "row_number"]
        unknown = [c for c in ids if c not in ("source_file", "row_number", "label_raw")]
        if unknown:
            raise UserError(f"score.id_columns {unknown}: a Zhang CSV has only source_file, row_number, label_raw")
        if is_line_mode(data):
            # Raw lines go to Python once: parse, clean, featurize and predict in one pass.
            df = read_lines(spark, fsutil.to_url(path)).withColumn("label_raw", F.lit(None).cast("string"))
            scan = spark.read.text(fsutil.to_url(path))
            return df.select(*ids, "raw"), ids, scan.filter(~blank_line(F.col("value")))
        df = read_text(spark, path, "score", data)
        return df.select(*ids, "parts", "raw", "reason"), ids, None
    data = cfg.data
    reader = spark.read
    if s.input_format == "csv":
        reader = reader.option("header", True).option("multiLine", data.multiline).option("escape", '"')
    df = reader.format(s.input_format).load(fsutil.to_url(path))
    need = [*s.id_columns, *data.text_columns]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise UserError(f"{path}: column(s) {', '.join(missing)} not found (have: {', '.join(df.columns)}); set score.id_columns / data.text_columns")
    # Numbers cast to text fine; a struct/array/map/binary "text" column cannot be scored.
    nested = [c for c in data.text_columns if df.schema[c].dataType.typeName() in ("struct", "array", "map", "binary")]
    parts = F.array(*[F.lit(None).cast("string") if c in nested else F.col(c).cast("string") for c in data.text_columns])
    reason = F.when(F.lit(bool(nested)), F.lit("text_not_string"))
    if "_corrupt_record" in df.columns:
        reason = F.coalesce(reason, F.when(F.col("_corrupt_record").isNotNull(), F.lit("malformed_record")))
    raw = F.to_json(F.struct(*[F.col(c) for c in df.columns]))
    out = df.select(*s.id_columns, parts.alias("parts"), raw.alias("raw"), reason.alias("reason"))
    return out, list(s.id_columns), out


IMAGE_FILE_IDS = ("path", "modificationTime", "length")
# An Arrow batch holds its rows' encoded files: at most this many, whatever
# score.max_records_per_batch says for text rows (128 x a 5 MB photo is 640 MB per worker).
IMAGE_RECORDS_PER_BATCH = 128


def _read_images(spark, s: ScoreConfig, path: str):
    """Image inputs -> (DataFrame(ids..., content binary, raw string, reason string), ids, scan).

    ``content`` is null on rows already rejected here: files or values over
    ``score.max_image_bytes`` (``image_too_large``), null values (``null_image``), a column
    that is not binary (``image_not_binary``). ``raw`` identifies the row in rejects.
    """
    from pyspark.sql import functions as F

    from dl_pipeline.sources import image_files, image_tasks

    url, limit = fsutil.to_url(path), s.max_image_bytes
    none = F.lit(None)
    if s.input_format == "image_files":
        ids = list(s.id_columns) or ["path"]
        unknown = [c for c in ids if c not in IMAGE_FILE_IDS]
        if unknown:
            raise UserError(f"score.id_columns {unknown}: image files have only {', '.join(IMAGE_FILE_IDS)}")
        files = image_files(spark, url)
        # The filter on length reaches the file source, which checks it before reading a file:
        # an oversize file is listed and rejected, never loaded into memory.
        fits = F.col("length") <= limit
        read = files.filter(fits).select(*ids, "content", F.col("path").alias("raw"), none.cast("string").alias("reason"))
        skipped = files.filter(~fits).select(*ids, none.cast("binary").alias("content"), F.col("path").alias("raw"),
                                             F.lit("image_too_large").alias("reason"))
        # Fewer, larger tasks than Spark's packing of small files (see image_tasks). Each side is
        # coalesced on its own: coalescing the union would give every file to be read to the
        # same tasks, and the oversize side only lists files.
        return read.coalesce(image_tasks(spark, files)).unionByName(skipped.coalesce(1)), ids, None
    df = spark.read.format(s.input_format).load(url)
    ids, col = list(s.id_columns), s.image_column
    missing = [c for c in [*ids, col] if c not in df.columns]
    if missing:
        raise UserError(f"{path}: column(s) {', '.join(missing)} not found (have: {', '.join(df.columns)}); "
                        "set score.id_columns / score.image_column")
    if df.schema[col].dataType.typeName() != "binary":  # e.g. base64 text: every row is a reject
        content, reason = none.cast("binary"), F.lit("image_not_binary")
    else:
        content = F.col(col)
        reason = F.when(content.isNull(), F.lit("null_image")).when(F.length(content) > limit, F.lit("image_too_large"))
    raw = F.to_json(F.struct(*[F.col(c) for c in ids])) if ids else none.cast("string")
    out = df.select(*ids, F.when(reason.isNull(), content).alias("content"), raw.alias("raw"), reason.alias("reason"))
    return out, ids, out


# Under the output path but '_'-prefixed: Spark's partition discovery skips it, so readers of
# the predictions table never trip over the rejects' own dt= folders.
REJECTS_DIR = "_rejects"
INJECT_FAILURE_CONF = "spark.dl_pipeline.test.inject_score_failure"
DROP_ROW_CONF = "spark.dl_pipeline.test.drop_a_scored_row"
BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"


def _score_fn(model_path: str, version: str, ids: list[str], batch_size: int, top_k: int, max_chars: int, separator: str,
              num_fields: int, inject_failure: bool = False, drop_a_row: bool = False):
    """mapInPandas body: raw rows -> scored rows, bad rows flagged with a reason (never raised).
    Test hooks: ``inject_failure`` dies mid-task; ``drop_a_row`` loses a row (the accounting
    check must catch it)."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        bundle = worker_bundle(model_path, version)
        for n_batch, pdf in enumerate(batches):
            if inject_failure and n_batch == 1:  # test hook: die mid-task, after output began
                raise RuntimeError("injected scoring failure")
            out = scored_rows(bundle, pdf, ids, batch_size, top_k, max_chars, separator, num_fields)
            yield out.iloc[1:] if drop_a_row and n_batch == 0 else out

    return run


def _spread_over_cores(spark, df, scan):
    """A small input is one task (Spark packs files under 4 MB into one split), so a heavy
    model would run on one core: spread its rows over every core first. Inputs that already
    span the cores are left alone (the shuffle would cost more than it buys)."""
    cores = spark.sparkContext.defaultParallelism
    if scan is None or cores <= 1 or scan.rdd.getNumPartitions() >= cores:
        return df
    return df.repartition(cores)


def _replace_partition(spark, df, url: str, fmt: str, date: str, rows: int) -> None:
    """Delta: make ``df``'s rows (``rows`` of them) the whole ``dt=<date>`` partition of the
    table at ``url`` in one transaction (replaceWhere empties the date even when df is empty);
    other dates stay."""
    df.write.format(fmt).mode("overwrite").partitionBy("dt").option("replaceWhere", f"dt = '{date}'").save(url)


STAGING_DIR = "_staging"
# Test hook, "<point>:<dir>": the driver announces its pid in dir and waits to be killed, at
# "staged" (predictions staged, rejects not yet) or "commit" (between the two moves).
PAUSE_CONF = "spark.dl_pipeline.test.score_pause"


def _pause_at(spark, point: str) -> None:
    at, _, pause_dir = spark.conf.get(PAUSE_CONF, "").partition(":")
    if at and at == point:
        wait_to_be_killed(pause_dir)


def _journal(out: str, date: str) -> str:
    return fsutil.join(out, "_runs", f"{date}.commit")


def _apply_moves(spark, moves: list[list[str | None]], pause=lambda: None) -> None:
    """Each (src, dst): ``dst`` replaced by the directory ``src`` (a Hadoop rename), or deleted
    when src is None (no rows). Idempotent, so an interrupted commit can be run again: a src
    already moved is gone and its move is skipped."""
    for i, (src, dst) in enumerate(moves):
        if src is None:
            hadoop_delete(spark, dst)
            continue
        fs, path = hadoop_path(spark, src)
        if not fs.exists(path):
            continue
        hadoop_delete(spark, dst)
        target = hadoop_path(spark, dst)[1]
        fs.mkdirs(target.getParent())
        if not fs.rename(path, target):
            raise PipelineError(f"could not move {src} to {dst}")
        if i == 0:
            pause()


def _commit(spark, out: str, date: str, moves: list[list[str | None]]) -> None:
    """Move a run's staged partitions into place as one commit: the moves are written to a
    journal first, so a run killed part-way is finished by the next run of the date
    (``_finish_interrupted_commit``) instead of leaving new predictions beside old rejects."""
    journal = _journal(out, date)
    fsutil.write_text_atomic(journal, json.dumps({"moves": moves}))
    _apply_moves(spark, moves, lambda: _pause_at(spark, "commit"))
    hadoop_delete(spark, journal)


def _finish_interrupted_commit(spark, out: str, date: str) -> None:
    """Roll forward a commit of ``date`` that a killed run left half done, then clear any
    staged files of killed runs. Runs under the date's lock."""
    journal = _journal(out, date)
    if fsutil.exists(journal):
        _apply_moves(spark, json.loads(fsutil.read_text(journal))["moves"])
        hadoop_delete(spark, journal)
        log.warning("score: finished the commit of %s that an earlier, interrupted run left half done", date)
    hadoop_delete(spark, fsutil.join(out, STAGING_DIR, date))


def score_batch(spark, cfg: Config) -> dict[str, Any]:
    """Score one run date; returns {"summary": {...}} and writes it under ``_runs/``."""

    s = cfg.score
    for key in ("model_path", "input_path", "output_path"):
        if not getattr(s, key):
            raise UserError(f"score.{key} is not set: pass --set score.{key}=...")
    date = run_date(s)
    t0 = time.time()
    from dl_pipeline.bundle import load_bundle
    from dl_pipeline.mlflow_io import is_model_uri, resolve_bundle

    model_uri = s.model_path if is_model_uri(s.model_path) else None
    if model_uri:  # models:/name@alias -> the bundle, copied once where every executor reads it
        cfg = replace(cfg, score={"model_path": resolve_bundle(model_uri, fsutil.join(fsutil.to_url(s.output_path), "_models"))})
        s = cfg.score
        log.info("score: %s resolved to %s", model_uri, s.model_path)

    bundle = load_bundle(s.model_path)  # fail fast on the driver with a clear message
    classes = len(bundle.labels["names"])
    if s.top_k > classes:
        raise UserError(f"score.top_k={s.top_k} but {s.model_path} has {classes} classes: set score.top_k <= {classes} (0 = off)")
    kind = bundle.featurizer["kind"]
    if kind == "image" and s.input_format not in ("image_files", "parquet"):
        raise UserError(f"{s.model_path}: an image model scores images: set score.input_format=image_files (PNG/JPEG files "
                        "under score.input_path) or parquet (encoded bytes in score.image_column)")
    if kind == "text" and s.input_format == "image_files":
        raise UserError(f"{s.model_path}: a text model cannot score image files; set score.input_format to zhang_csv, csv, json or parquet")
    in_path = s.input_path.replace("{date}", date)
    per_batch = s.max_records_per_batch if kind == "text" else min(s.max_records_per_batch, IMAGE_RECORDS_PER_BATCH)
    before = spark.conf.get(BATCH_CONF, None)
    spark.conf.set(BATCH_CONF, str(per_batch))  # the plans below take it; the caller's value is put back (notebooks)
    lock = fsutil.join(fsutil.to_url(s.output_path), "_runs", f"{date}.lock")
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    try:
        # two runs of one date would interleave their replacements of the partition: one at a time
        with fsutil.exclusive_lock(lock, {"started": started, "model_version": bundle.version}, f"score for {date}",
                                   stale_after_s=s.stale_lock_after_s):
            return _score_date(spark, cfg, bundle, kind, date, in_path, t0, model_uri)
    finally:
        if before is None:
            spark.conf.unset(BATCH_CONF)
        else:
            spark.conf.set(BATCH_CONF, before)


def _score_date(spark, cfg: Config, bundle, kind: str, date: str, in_path: str, t0: float,
                model_uri: str | None = None) -> dict[str, Any]:
    """score_batch's job, with the session's Arrow batch size already set."""
    s = cfg.score
    out = fsutil.to_url(s.output_path)
    _finish_interrupted_commit(spark, out, date)
    files = _own_io_files(cfg, kind, in_path, spark.sparkContext.defaultParallelism)
    if files is not None:
        rows_in, by_reason, by_label, counts = _score_with_own_io(spark, cfg, bundle, date, files, out)
    else:
        rows_in, by_reason, by_label, counts = _score_with_spark_io(spark, cfg, bundle, kind, date, in_path, out)
    if rows_in == 0:  # legitimate for a quiet day, but worth a line in a scheduled job's log
        log.warning("score: %s has no rows for run date %s (image inputs: no .png/.jpg/.jpeg files); "
                    "the date's partitions are now empty", in_path, date)
    summary = {
        "run_date": date,
        "input_path": in_path,
        "output_path": out,
        "model_version": bundle.version,
        **({"model_uri": model_uri} if model_uri else {}),
        "io": "spark" if files is None else "python",  # who moved the rows (score.io)
        "rows_in": rows_in,
        "scored": counts.get(True, 0),
        "rejected": counts.get(False, 0),
        "rejects_by_reason": dict(sorted(by_reason.items())),
        "predictions_by_label": dict(sorted(by_label.items())),
        "seconds": round(time.time() - t0, 3),
    }
    record = {**summary, "config": cfg.to_dict()}  # the resolved config travels with every output
    fsutil.write_text_atomic(fsutil.join(out, "_runs", f"{date}.json"), json.dumps(record, indent=2, sort_keys=True))
    log.info("score summary: %s", json.dumps(summary, sort_keys=True))
    return {"summary": summary}


def _tally(rows: Iterable[tuple[Any, Any, int]]) -> tuple[dict[str, int], dict[str, int], dict[bool, int]]:
    """(reason, label_name, rows) -> (rejects by reason, scored rows by predicted label,
    {True: scored, False: rejected})."""
    by_reason: dict[str, int] = {}
    by_label: dict[str, int] = {}  # the scored rows' predicted labels (the report's distribution per date)
    for reason, label, n in rows:
        tally = by_label if reason is None else by_reason
        key = label if reason is None else reason
        tally[key] = tally.get(key, 0) + n
    return by_reason, by_label, {True: sum(by_label.values()), False: sum(by_reason.values())}


def _check_accounting(rows_in: int, counts: dict[bool, int], date: str) -> None:
    if counts[True] + counts[False] != rows_in:  # counted apart, before anything is written
        raise PipelineError(f"score lost or duplicated rows: {rows_in} rows in, {counts[True]} scored + {counts[False]} "
                            f"rejected for {date}; nothing was written, the date keeps its previous result")


def _own_io_files(cfg: Config, kind: str, in_path: str, cores: int) -> list[str] | None:
    """The input files (URLs as Spark names them) when score's own tasks read and write them
    (``score.io``), else None."""

    from dl_pipeline.score_tasks import gzip_holds_up_the_cores, input_files, spark_file_urls
    from dl_pipeline.sources import is_line_mode

    s = cfg.score
    data = DataConfig(**{**cfg.data.__dict__, "format": "zhang_csv"})  # as _read_input reads it
    fits = kind == "text" and s.input_format == "zhang_csv" and is_line_mode(data) and s.output_format == "parquet"
    if s.io == "spark" or (s.io == "auto" and not fits):
        return None
    if not fits:
        raise UserError("score.io=python scores Zhang CSV lines (score.input_format=zhang_csv, data.encoding UTF-8, "
                        "data.multiline: false) into Parquet; set score.io=auto")
    if s.io == "auto" and not all(fsutil.local_path(u) for u in (in_path, s.output_path)):
        return None
    why = fsutil.filesystem_error(in_path) or fsutil.filesystem_error(s.output_path)
    if why:
        raise UserError(f"score.io=python: Python cannot reach {in_path} or {s.output_path} ({why}); set score.io=auto")
    fs, path = fsutil.fs_and_path(in_path)
    files, why_not = input_files(fs, path)
    if why_not:
        if s.io == "python":
            raise UserError(f"score.io=python cannot read the input as Spark's reader does: {why_not}; set score.io=auto")
        return None
    if not files:
        raise UserError(f"score.input_path={in_path}: no such file or directory; fix the path or --run-date")
    if s.io == "auto" and gzip_holds_up_the_cores(fs, files, cores):
        return None
    return spark_file_urls(in_path, files)


def _score_with_own_io(spark, cfg: Config, bundle, date: str, files: list[str], out: str):
    """Score ``files``' lines with score's own tasks (score_tasks), then commit. -> (rows in,
    rejects by reason, scored by label, {True: scored, False: rejected})."""
    from dl_pipeline.score_tasks import ScoreTask, stage_scores

    s = cfg.score
    cleaning = bundle.featurizer.get("cleaning", {})
    stage = fsutil.join(out, STAGING_DIR, date, uuid.uuid4().hex[:8])
    task = ScoreTask(
        model_url=fsutil.to_url(s.model_path), version=bundle.version, ids=tuple(s.id_columns) or ("source_file", "row_number"),
        batch_size=s.batch_size, top_k=s.top_k, max_chars=cleaning.get("max_text_chars", cfg.data.max_text_chars),
        separator=cleaning.get("title_separator", ""), num_fields=cfg.data.num_fields, records_per_batch=s.max_records_per_batch,
        stage=stage, date=date, scored_at=dt.datetime.now(dt.timezone.utc),
        inject_failure=spark.conf.get(INJECT_FAILURE_CONF, "false") == "true",
        drop_a_row=spark.conf.get(DROP_ROW_CONF, "false") == "true")
    unknown = [c for c in task.ids if c not in ("source_file", "row_number", "label_raw")]
    if unknown:
        raise UserError(f"score.id_columns {unknown}: a Zhang CSV has only source_file, row_number, label_raw")
    try:
        rows_in, tallies = stage_scores(spark, files, task)
        by_reason, by_label, counts = _tally((r, label, n) for (r, label), n in tallies.items())
        _check_accounting(rows_in, counts, date)
        _pause_at(spark, "staged")
    except BaseException:
        hadoop_delete(spark, stage)  # nothing was moved: the date keeps its previous result
        raise
    moves = [[fsutil.join(stage, name, f"dt={date}") if n else None, fsutil.join(table, f"dt={date}")]
             for name, n, table in (("scores", counts[True], out), ("rejects", counts[False], fsutil.join(out, REJECTS_DIR)))]
    _commit(spark, out, date, moves)
    hadoop_delete(spark, fsutil.join(out, STAGING_DIR, date))
    return rows_in, by_reason, by_label, counts


def _score_with_spark_io(spark, cfg: Config, bundle, kind: str, date: str, in_path: str, out: str):
    """Score with Spark's readers and writers, then commit. -> as _score_with_own_io."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    s = cfg.score
    raw, ids, scan = _read_input(spark, cfg, in_path, kind)
    if not ids:
        log.warning("score: score.id_columns is empty: the predictions of %s cannot be joined back to its rows; set "
                    "score.id_columns to the input's key column(s)", in_path)
    # Counted on its own, before any of our code sees a row: the identity check below compares it
    # with what the scoring wrote, so a lost or duplicated row fails the run.
    rows_in = (scan if scan is not None else raw).count()
    raw = _spread_over_cores(spark, raw, scan)
    out_schema = raw.select(*ids).schema
    ddl = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in out_schema.fields)
    ddl += ", prediction int, label_name string, probability double"
    if s.top_k:
        ddl += ", top_k array<struct<label:int,probability:double>>"
    ddl += ", model_version string, raw string, reason string"
    model_url = fsutil.to_url(s.model_path)
    scored = raw.mapInPandas(
        _score_fn(model_url, bundle.version, ids, s.batch_size, s.top_k,
                  bundle.featurizer.get("cleaning", {}).get("max_text_chars", cfg.data.max_text_chars),
                  bundle.featurizer.get("cleaning", {}).get("title_separator", ""), cfg.data.num_fields,
                  spark.conf.get(INJECT_FAILURE_CONF, "false") == "true", spark.conf.get(DROP_ROW_CONF, "false") == "true"),
        ddl,
    ).withColumn("scored_at", F.current_timestamp()).withColumn("dt", F.lit(date))
    scored = scored.persist(StorageLevel.MEMORY_AND_DISK)
    fmt = s.output_format
    if fmt == "delta":
        try:
            import delta  # noqa: F401
        except ImportError:
            raise UserError("score.output_format=delta needs delta-spark on the cluster (Databricks has it); use parquet") from None
    try:
        # The count runs the model once and fills the cache; both writes then read the cache.
        rows = scored.groupBy("reason", "label_name").agg(F.count(F.lit(1)).alias("n")).collect()
        by_reason, by_label, counts = _tally((r["reason"], r["label_name"], r["n"]) for r in rows)
        _check_accounting(rows_in, counts, date)
        good = scored.filter(F.col("reason").isNull()).drop("raw", "reason")
        bad = scored.filter(F.col("reason").isNotNull()).select(*ids, "raw", "reason", "model_version", "scored_at", "dt")
        if fmt == "delta":
            _replace_partition(spark, good, out, fmt, date, counts[True])
            _replace_partition(spark, bad, fsutil.join(out, REJECTS_DIR), fmt, date, counts[False])
        else:
            # Both written in full under _staging (hidden from readers of the table), then
            # moved into place together: see _commit.
            stage = fsutil.join(out, STAGING_DIR, date, uuid.uuid4().hex[:8])
            moves = []
            try:
                for df, n, name, table in ((good, counts[True], "scores", out), (bad, counts[False], "rejects", fsutil.join(out, REJECTS_DIR))):
                    if n:
                        df.write.format(fmt).mode("overwrite").partitionBy("dt").save(fsutil.join(stage, name))
                    if name == "scores":
                        _pause_at(spark, "staged")
                    moves.append([fsutil.join(stage, name, f"dt={date}") if n else None, fsutil.join(table, f"dt={date}")])
            except BaseException:
                hadoop_delete(spark, stage)  # nothing was moved: the date keeps its previous result
                raise
            _commit(spark, out, date, moves)
            hadoop_delete(spark, fsutil.join(out, STAGING_DIR, date))
    finally:
        scored.unpersist()
    return rows_in, by_reason, by_label, counts
