"""score with its own I/O (``score.io``): Spark schedules the tasks; each task reads the lines
of one byte range of a text file (``line_splits``) and writes its scores and rejects as Parquet
parts of the staged partitions.

Why: for a model whose per-row work is cheap (fastText: parse, clean, featurize, predict ~16
CPU-us a row), Spark moving every line in and every prediction out cost another 8.4 CPU-us a row
in the JVM (three scans of the input for the count, the row numbers and the rows; Arrow both
ways; a cache; two Parquet writes): bench/score_bench.py. Here the JVM only schedules.

Two jobs: the first counts each split's lines (terminators, counted: the row numbers' offsets
and ``rows_in``, apart from the scoring code), the second scores. A task's output files are
named by its split, written in the stage's ``_tmp/`` folder (never moved into the table) and
moved into place whole, so a retried or speculative attempt replaces them with the same rows. The driver (``score._score_date``) checks the
accounting and commits as for Spark's writes.

Driver code: ``stage_scores``. Executor code: the ``_*_fn`` closures, which take picklable values.
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import re
from dataclasses import dataclass
from typing import Any

from dl_pipeline import fsutil
from dl_pipeline.errors import UserError
from dl_pipeline.line_splits import BrokenFile, LineSplit, count_lines, is_gzip, lines_before, plan, read_lines

# A split is at most this many bytes (Spark's spark.sql.files.maxPartitionBytes default is
# 128 MB). A task reads it line_splits.CHUNK_BYTES (16 MB) at a time: ~4x that in memory.
MAX_SPLIT_BYTES = 64 << 20
# Rows per Parquet row group: batches are gathered to this before they are written.
ROW_GROUP_ROWS = 1 << 16
# Hadoop's codecs, by extension: Spark's text source decompresses these; Python tasks read gzip
# alone (line_splits), the rest go to Spark's reader.
COMPRESSED = (".gz", ".bz2", ".deflate", ".lz4", ".snappy", ".zst")



@dataclass(frozen=True)
class ScoreTask:
    """What every scoring task gets: the model, the parse and batch settings, where to write."""

    model_url: str
    version: str
    ids: tuple[str, ...]
    batch_size: int
    top_k: int
    max_chars: int
    separator: str
    num_fields: int
    records_per_batch: int
    stage: str  # URL: parts go to <stage>/scores/dt=<date>/ and <stage>/rejects/dt=<date>/
    date: str
    scored_at: dt.datetime  # one instant for the whole run (as Spark's current_timestamp())
    inject_failure: bool = False
    drop_a_row: bool = False

    def __post_init__(self) -> None:
        if self.records_per_batch < 1 or self.batch_size < 1:
            raise ValueError("ScoreTask: records_per_batch and batch_size must be >= 1")
        if self.scored_at.tzinfo is None:
            raise ValueError("ScoreTask: scored_at must carry its time zone")


# Characters a path may hold for source_file to read as Spark's input_file_name() writes it
# (Spark URL-encodes the path; these need no encoding).
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/._~=+,@-]*")


def input_files(fs, path: str) -> tuple[list[str], str | None]:
    """(the files ``path`` names: a file, a folder of files or a glob, as Spark's text source
    lists them; why own I/O would not read them as Spark does, naming the file, or None)."""
    if "{" in path:
        return [], f"{path}: a {{a,b}} glob (Hadoop's globbing, not Python's)"
    if fs.isdir(path):
        entries = fs.ls(path, detail=True)
        nested = [e["name"] for e in entries if e["type"] == "directory"]
        if nested:
            return [], f"{nested[0]}: a folder inside the input (Spark's listing decides what it reads there)"
        files = [e["name"] for e in entries if not fsutil.spark_skips(os.path.basename(e["name"]))]
    else:
        files = fs.glob(path) if any(c in path for c in "*?[") else ([path] if fs.exists(path) else [])
        for f in files:
            if fs.isdir(f):
                return [], f"{f}: a folder the glob names (Spark's listing decides what it reads there)"
            if fsutil.spark_skips(os.path.basename(f)):
                return [], f"{f}: a hidden name (_ or .), which Spark's reader skips"
    for f in files:
        if f.lower().endswith(COMPRESSED) and not is_gzip(f):
            return [], f"{f}: compressed other than gzip (Spark's reader decompresses it)"
        if not _PLAIN_PATH.fullmatch(f):
            return [], f"{f}: characters that Spark URL-encodes in source_file"
    return sorted(files), None


# Text shrinks ~2.4-4x under gzip (AG News: 2.4x): a gzip file's bytes, weighed as lines to score.
GZIP_RATIO = 3


def spark_file_urls(path: str, files: list[str]) -> list[str]:
    """``input_files``' files of the user's ``path`` -> their URLs as Spark's ``input_file_name()``
    gives them: the user's scheme (s3a, dbfs), not fsspec's."""
    from urllib.parse import urlparse

    scheme = urlparse(path).scheme
    if scheme in ("", "file"):
        return [fsutil.to_url(f) for f in files]
    if scheme == "dbfs":
        return ["dbfs:/" + f.removeprefix("/dbfs/").lstrip("/") for f in files]
    return [f"{scheme}://{f.lstrip('/')}" for f in files]


def gzip_holds_up_the_cores(fs, files: list[str], cores: int) -> bool:
    """Whether one gzip file (one task: it cannot be cut) holds more than twice an even share of
    the input's lines per core. Spark's reader then does better: it reads the file in one task
    too, but spreads its lines over every core to score them (``_spread_over_cores``). Twice,
    since own I/O costs ~1/1.44 of Spark's I/O per row (bench/score_bench.py) and saves the
    shuffle: on 2 cores one 1M-row gzip file scored in 0.75x the wall time of Spark's reader."""
    weight = {f: fs.size(f) * (GZIP_RATIO if is_gzip(f) else 1) for f in files}
    largest = max((w for f, w in weight.items() if is_gzip(f)), default=0)
    return largest > 2 * sum(weight.values()) / max(1, cores)


def run_tasks(spark, n: int, fn) -> list:
    """``fn(i)`` for each split i in 0..n-1, one task each; -> the rows it returned, all tasks'.

    An RDD job, not a DataFrame one: a mapInArrow query over n rows cost ~0.8 CPU-s of planning,
    code generation and JIT per run, this ~0.25 (score already needs the classic JVM session:
    its commit renames with Hadoop's FileSystem)."""
    return spark.sparkContext.parallelize(range(n), max(n, 1)).flatMap(fn).collect()


def first_numbers(spark, splits: list[LineSplit]) -> tuple[list[int], int, str | None]:
    """Count the splits' lines in one job -> (each split's first physical line number, the
    non-blank lines of all, a broken file's message or None)."""
    counts = sorted(run_tasks(spark, len(splits), _count_fn(splits)), key=lambda c: c[0])
    broken = [c[2] for c in counts if c[1] is None]
    if broken:
        return [], 0, broken[0]
    first = [n + 1 for n in lines_before(splits, [physical for _, physical, _ in counts])]
    return first, sum(records for _, _, records in counts), None


def stage_scores(spark, files: list[str], task: ScoreTask) -> tuple[int, dict[tuple[Any, Any], int]]:
    """Score the lines of ``files`` (URLs) into ``task.stage``. -> (rows in: non-blank lines,
    counted apart; {(reason, label_name): rows} of what was written)."""
    sizes = {}
    for url in files:
        fs, path = fsutil.fs_and_path(url)
        sizes[url] = fs.size(path)
    splits = plan(sizes, 2 * spark.sparkContext.defaultParallelism, MAX_SPLIT_BYTES)
    if not splits:
        return 0, {}
    first, rows_in, broken = first_numbers(spark, splits)
    if broken:  # found while counting, before anything is written
        raise UserError(f"{broken}: deliver it again or move it out of the input; the date keeps its previous result")
    tallies: dict[tuple[Any, Any], int] = collections.Counter()
    for reason, label, n in run_tasks(spark, len(splits), _score_fn(splits, first, task)):
        tallies[(reason, label)] += n
    return rows_in, dict(tallies)


def _count_fn(splits: list[LineSplit]):
    def run(i: int) -> list[tuple]:
        """-> [(i, physical lines, non-blank lines)], or [(i, None, why)] for a broken file."""
        try:
            return [(i, *count_lines(splits[i]))]
        except BrokenFile as exc:
            return [(i, None, str(exc))]

    return run


def _score_fn(splits: list[LineSplit], first: list[int], task: ScoreTask):
    def run(i: int) -> list[tuple[Any, Any, int]]:
        return [(*key, n) for key, n in score_split(splits[i], first[i], i, task).items()]

    return run


def output_schemas(ids: tuple[str, ...], top_k: int):
    """-> (scores, rejects) Arrow schemas: the columns and types Spark's writer gives them."""
    import pyarrow as pa

    id_types = {"source_file": pa.string(), "row_number": pa.int64(), "label_raw": pa.string()}
    id_fields = [pa.field(c, id_types[c]) for c in ids]
    ts = pa.field("scored_at", pa.timestamp("us", tz="UTC"))
    scores = [*id_fields, pa.field("prediction", pa.int32()), pa.field("label_name", pa.string()),
              pa.field("probability", pa.float64())]
    if top_k:
        scores.append(pa.field("top_k", pa.list_(pa.struct([("label", pa.int32()), ("probability", pa.float64())]))))
    scores += [pa.field("model_version", pa.string()), ts]
    rejects = [*id_fields, pa.field("raw", pa.string()), pa.field("reason", pa.string()), pa.field("model_version", pa.string()), ts]
    return pa.schema(scores), pa.schema(rejects)


class _PartWriter:
    """One Parquet part of a staged partition, opened at its first rows. It is written in the
    stage's ``_tmp/`` folder (never moved into the table) and moved into place whole at
    ``close``; ``discard`` removes it. Rows are gathered into row groups of ROW_GROUP_ROWS."""

    def __init__(self, url: str, tmp_folder: str, schema):
        self.schema, self.pending, self.writer = schema, [], None
        self.fs, self.path = fsutil.fs_and_path(url)
        self.tmp = fsutil.fs_and_path(tmp_folder)[1]

    def write(self, table) -> None:
        if table.num_rows:
            self.pending.append(table)
            if sum(t.num_rows for t in self.pending) >= ROW_GROUP_ROWS:
                self.flush()

    def flush(self) -> None:
        import uuid

        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending:
            return
        if self.writer is None:
            self.fs.makedirs(self.tmp, exist_ok=True)
            self.tmp = f"{self.tmp}/{os.path.basename(self.path)}.{uuid.uuid4().hex[:8]}"
            self.fh = self.fs.open(self.tmp, "wb")
            # INT96 timestamps, as Spark writes them: one table, whichever way a date was written.
            self.writer = pq.ParquetWriter(self.fh, self.schema, use_deprecated_int96_timestamps=True)
        self.writer.write_table(pa.concat_tables(self.pending), row_group_size=ROW_GROUP_ROWS)
        self.pending = []

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.fh.close()
            self.fs.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.fs.mv(self.tmp, self.path)

    def discard(self) -> None:
        """After a failure: close and delete the unfinished file, if one was begun."""
        if self.writer is not None:
            for done in (self.writer.close, self.fh.close, lambda: self.fs.rm(self.tmp)):
                try:
                    done()
                except Exception:  # noqa: BLE001 - the task's own error is the one to report
                    pass


def _batches(pieces, step: int):
    """Pieces (numbers int64 [n], lines [n]) -> batches of ``step`` rows, the last maybe short: cut
    as if the split came in one piece, so what a model batch holds (and with it the float
    rounding of its scores) does not depend on the piece size."""
    import numpy as np

    held_numbers, held_lines = np.empty(0, dtype=np.int64), []
    for numbers, lines in pieces:
        if held_lines:
            numbers, lines = np.concatenate([held_numbers, numbers]), held_lines + lines
        full = len(lines) - len(lines) % step
        for a in range(0, full, step):
            yield numbers[a:a + step], lines[a:a + step]
        held_numbers, held_lines = numbers[full:], lines[full:]
    if held_lines:
        yield held_numbers, held_lines


def score_split(split: LineSplit, first_number: int, index: int, task: ScoreTask) -> dict[tuple[Any, Any], int]:
    """Score the non-blank lines of ``split`` (its first line numbered ``first_number``) and write
    them as part ``index`` of the staged scores and rejects. -> {(reason, label_name): rows}."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    from dl_pipeline.scoring import scored_rows, worker_bundle

    bundle = worker_bundle(task.model_url, task.version)
    scores_schema, rejects_schema = output_schemas(task.ids, task.top_k)
    part = f"part-{index:05d}.parquet"
    tmp = fsutil.join(task.stage, "_tmp")
    scores = _PartWriter(fsutil.join(task.stage, "scores", f"dt={task.date}", part), tmp, scores_schema)
    rejects = _PartWriter(fsutil.join(task.stage, "rejects", f"dt={task.date}", part), tmp, rejects_schema)
    tally: collections.Counter = collections.Counter()
    step = task.records_per_batch
    try:
        for n_batch, (numbers, lines) in enumerate(_batches(read_lines(split, first_number), step)):
            if task.inject_failure and n_batch == 1:  # test hook: die mid-task, with a part begun
                scores.flush()
                raise RuntimeError("injected scoring failure")
            pdf = pd.DataFrame({"source_file": split.url, "row_number": numbers, "raw": lines})
            out = scored_rows(bundle, pdf, list(task.ids), task.batch_size, task.top_k, task.max_chars, task.separator,
                              task.num_fields)
            if task.drop_a_row and n_batch == 0:  # test hook: lose a row (the accounting must catch it)
                out = out.iloc[1:]
            tally.update(zip(out["reason"], out["label_name"], strict=True))
            out["scored_at"] = pd.Timestamp(task.scored_at)
            table = pa.Table.from_pandas(out, preserve_index=False)
            bad = pc.is_valid(table.column("reason"))
            scores.write(table.filter(pc.invert(bad)).select(scores_schema.names).cast(scores_schema))
            rejects.write(table.filter(bad).select(rejects_schema.names).cast(rejects_schema))
        scores.close()
        rejects.close()
    except BaseException:
        scores.discard()
        rejects.discard()
        raise
    return tally
