"""Readers: raw datasets -> one "raw frame" shape, every input row present exactly once.

Raw frame columns (all sources)::

    origin      string   "train" or "test" (which configured input the row came from)
    source_file string   URI of the file
    row_number  long     1-based record number within the file (CSV records, idx items); null
                         for image folders, where source_file names the image
    label_raw   string   the label as written (text: "3"; image folder: the class folder name)
    parts       array<string>  text fields in order (title, body, ...); null for images
    content     binary   decoded pixels (images); null for text
    raw         string   the record as read, for the rejects table
    reason      string   null, or why the row is already rejected (malformed record, ...)
    text, text_reason    line-mode Zhang CSV only (its ``parts`` is null): the cleaned text
                         and the text's reject reason (invalid_utf8, text_too_long), computed
                         in the same Arrow pass as parsing; other sources leave the checks and
                         the cleaning to prepare's spill tasks (prepare_tasks.spill_frame)
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import re
import struct
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from dl_pipeline import fsutil
from dl_pipeline.config import DataConfig
from dl_pipeline.errors import UserError
from dl_pipeline.features import check_record

_FIELD_LIMIT = 1 << 30


def _check_inputs(path: str, key: str) -> list[str]:
    files = fsutil.expand(path)
    if not files:
        raise UserError(f"{key}={path}: no such file or directory; fix the path (Hadoop URIs like s3a:// work too)")
    return files


def _with_row_numbers(spark, df):
    """Add exact 1-based record numbers per file without collecting the data.

    Within one scan task rows arrive in file order and ``monotonically_increasing_id`` counts
    them; a file split over several tasks has its splits in task order. So one small aggregate
    (rows and first id per file and task) gives each task's offset within its file.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    df = df.withColumn("source_file", F.input_file_name()).withColumn("_pid", F.spark_partition_id()).withColumn(
        "_mid", F.monotonically_increasing_id()
    )
    stats = df.groupBy("source_file", "_pid").agg(F.count(F.lit(1)).alias("_n"), F.min("_mid").alias("_first"))
    w = Window.partitionBy("source_file").orderBy("_pid").rowsBetween(Window.unboundedPreceding, -1)
    offsets = stats.withColumn("_offset", F.coalesce(F.sum("_n").over(w), F.lit(0))).drop("_n")
    return (
        df.join(F.broadcast(offsets), ["source_file", "_pid"])
        .withColumn("row_number", F.col("_offset") + F.col("_mid") - F.col("_first") + 1)
        .drop("_pid", "_mid", "_first", "_offset")
    )


def parse_zhang_line(line: str, num_fields: int) -> tuple[str | None, list[str] | None, str | None]:
    """One CSV line -> (label, text fields, reject reason). Strict: stray or unclosed quotes fail."""
    # Fast path, exact: with exactly two quotes per field, all of them delimiters, no field holds
    # a quote, so splitting on '","' is what the csv module would return (~1.5x faster).
    if line.startswith('"') and line.endswith('"') and line.count('"') == 2 * num_fields:
        fields = line[1:-1].split('","')
        if len(fields) == num_fields:
            return fields[0], fields[1:], None
    # csv's default 128 KiB field limit would report a long row as broken quoting; length is
    # policed separately (data.max_text_chars -> text_too_long).
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)
    try:
        rows = list(csv.reader([line], strict=True))
    except csv.Error:
        return None, None, "malformed_quoting"
    if len(rows) != 1 or len(rows[0]) != num_fields:
        return None, None, "wrong_field_count"
    return rows[0][0], rows[0][1:], None


def arrow_strings(values) -> pd.Series:
    """Python strings (None allowed) -> an Arrow-backed Series, which Spark's Arrow UDF
    serializer passes on as is: ~1.5 us/row less than an object column."""
    import pyarrow as pa

    return pd.Series(pd.arrays.ArrowExtensionArray(pa.array(values, type=pa.string())))


@dataclasses.dataclass(frozen=True)
class Records:
    """Results for n lines, column by column (lists of n): the raw label; why the line failed
    to parse (or ``CONTINUATION``, or None); the cleaned text (None for unparsable or rejected
    rows); ``features.check_record``'s reason, kept apart so a label error still takes
    precedence; and ``record``, the whole record's text where it spans lines (for rejects),
    else None; the column is None where every line parsed on its own (``LineRecords.feed``'s
    usual batch), a list otherwise.

    Columns, not a tuple per line: the spill task hands them to Arrow as they are. A tuple per
    line (each holding its split-out fields alive until the piece was done) cost the spill pass
    1.1-2.3 CPU-us/row more, to build and to turn back into columns: 14.3-15.1 against
    12.3-13.9 us/row over 1M AG News rows, four alternations, the same spill files."""

    label: list
    reason: list
    text: list
    text_reason: list
    record: list | None = None

    def __len__(self) -> int:
        return len(self.label)

    def results(self) -> Iterator[tuple]:
        """(label, reason, text, text reason) per line."""
        return zip(self.label, self.reason, self.text, self.text_reason, strict=True)

    def records(self) -> list:
        """``record`` as a list of n."""
        return [None] * len(self.label) if self.record is None else self.record


def parse_and_clean_lines(lines: Sequence[str], num_fields: int, separator: str, max_chars: int,
                          reject_invalid_utf8: bool = True) -> Records:
    """Lines -> their ``Records`` (``record`` None).

    Parsing, checking (``features.check_record``, the one rule set for text) and cleaning in
    one Python pass: another Arrow UDF, or JVM checks on the split-out fields, would move every
    row between the JVM and Python once more.
    """
    labels, reasons, texts, text_reasons = [], [], [], []
    for line in lines:
        label, parts, reason = parse_zhang_line(line, num_fields)
        text = text_reason = None
        if reason is None:
            text_reason, text = check_record(parts, separator, max_chars, reject_invalid_utf8)
        labels.append(label)
        reasons.append(reason)
        texts.append(text)
        text_reasons.append(text_reason)
    return Records(labels, reasons, texts, text_reasons)


# A record whose quoted field holds line breaks spans physical lines. Its first and last lines
# have an odd number of quote characters (escaped quotes come in pairs); the lines between are
# each no record on their own.
MAX_RECORD_LINES = 1000  # a quote left open longer than this is a stray quote, not a record
CONTINUATION = "continuation"  # internal: this line belongs to the record opened above it
# A line that starts like a record ("<label>","...) starts one: two lines that each left a quote
# open are two broken records, not one record across them.
_RECORD_START = re.compile(r'"[^"]*","')


class LineRecords:
    """Line-mode Zhang CSV, lines in file order -> ``Records``, one result per line: a record's
    result on its first line, ``CONTINUATION`` on the rest of its lines.

    A line whose quote stays open (odd quote count, unparsable) waits for the next such line of
    the same file, and the lines between are parsed as one record, unless one of them parses or
    starts like a record on its own. That record, if it parses, is kept; if it does not, it is
    rejected once as ``malformed_multiline_record`` (``data.multiline: true`` reads it with
    Spark's more lenient CSV reader). When the quote is never closed (the file or task ends, a
    line between parses as a record on its own, ``MAX_RECORD_LINES``), the opening line alone is
    rejected and the lines after it are read again as lines.

    ``feed`` returns the results decided so far; a record still open waits for the next call,
    and ``finish`` settles it.
    """

    def __init__(self, num_fields: int, separator: str, max_chars: int, reject_invalid_utf8: bool = True):
        self.args = (num_fields, separator, max_chars, reject_invalid_utf8)
        self.open: list[tuple] = []  # (file, line, result) of the open record's lines so far

    def feed(self, files: Sequence, lines: Sequence[str]) -> Records:
        parsed = parse_and_clean_lines(lines, *self.args)
        if not self.open and parsed.reason.count(None) == len(parsed):  # the usual batch: nothing to join
            return parsed
        out: list[tuple] = []
        self._take(zip(files, lines, parsed.results(), strict=True), out)
        return _columns(out)

    def finish(self) -> Records:
        out: list[tuple] = []
        while self.open:
            self._give_up(out)
        return _columns(out)

    def _take(self, items, out: list[tuple]) -> None:
        for file, line, result in items:
            if not self.open:
                if result[1] is not None and line.count('"') % 2:
                    self.open = [(file, line, result)]
                else:
                    out.append((*result, None))
            elif file != self.open[0][0] or result[1] is None or _RECORD_START.match(line):
                # another file, a record on its own, or the start of one: the quote was stray
                self._give_up(out)
                self._take([(file, line, result)], out)
            else:
                self.open.append((file, line, result))
                if line.count('"') % 2:
                    self._close(out)
                elif len(self.open) > MAX_RECORD_LINES:
                    self._give_up(out)

    def _close(self, out: list[tuple]) -> None:
        record = "\n".join(line for _, line, _ in self.open)
        (result,) = parse_and_clean_lines([record], *self.args).results()
        if result[1] is not None:
            result = (None, "malformed_multiline_record", None, None)
        out.append((*result, record))
        out.extend((None, CONTINUATION, None, None, None) for _ in self.open[1:])
        self.open = []

    def _give_up(self, out: list[tuple]) -> None:
        """The open quote is not a record: its first line is rejected alone, the rest re-read."""
        (_, _, first), rest = self.open[0], self.open[1:]
        out.append((*first, None))
        self.open = []
        self._take(rest, out)


def _columns(rows: list[tuple]) -> Records:
    """(label, reason, text, text reason, record) per line -> ``Records``."""
    if not rows:
        return Records([], [], [], [])
    return Records(*(list(c) for c in zip(*rows, strict=True)))


def _parsed_frame(results: Records) -> pd.DataFrame:
    """LineRecords results -> the parse UDF's columns."""
    return pd.DataFrame({"label": arrow_strings(results.label), "reason": arrow_strings(results.reason),
                         "text": arrow_strings(results.text), "text_reason": arrow_strings(results.text_reason),
                         "record": arrow_strings(results.records())})


def _read_zhang_lines(spark, url: str, origin: str, data: DataConfig):
    """Line-oriented Zhang CSV: splittable, exact line numbers, the raw line kept for rejects."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    num_fields, separator, max_chars = data.num_fields, data.title_separator, data.max_text_chars
    reject_utf8 = data.invalid_utf8 == "reject"

    @pandas_udf("label string, reason string, text string, text_reason string, record string")
    def parse(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        # One task's lines arrive in file order; a record still open at a batch's end is
        # answered with the next batch (Spark allows the lag, not more rows than came in).
        records = LineRecords(num_fields, separator, max_chars, reject_utf8)
        for files, lines in batches:
            out = records.feed(files, lines)
            if len(out):
                yield _parsed_frame(out)
        out = records.finish()
        if len(out):
            yield _parsed_frame(out)

    # Nondeterministic: its result depends on the lines around a row, so Spark must evaluate it
    # once, before the filter below (a deterministic UDF was evaluated again after it, on fewer lines).
    parse = parse.asNondeterministic()
    parsed = read_lines(spark, url).withColumn("p", parse(F.xxhash64("source_file"), "raw"))
    # A record's other lines are part of it, not records: they leave here, uncounted.
    parsed = parsed.filter(F.col("p.reason").isNull() | (F.col("p.reason") != CONTINUATION))
    return parsed.select(
        F.lit(origin).alias("origin"),
        "source_file",
        "row_number",
        F.col("p.label").alias("label_raw"),
        F.lit(None).cast("array<string>").alias("parts"),
        F.lit(None).cast("binary").alias("content"),
        F.coalesce("p.record", "raw").alias("raw"),
        F.col("p.reason").alias("reason"),
        F.col("p.text").alias("text"),
        F.col("p.text_reason").alias("text_reason"),
    )


def is_line_mode(data: DataConfig) -> bool:
    """Zhang CSV with one record per line, UTF-8: read as text lines and parsed in Python."""
    return data.format == "zhang_csv" and not data.multiline and data.encoding.upper().replace("-", "") == "UTF8"


def read_lines(spark, url: str):
    """Text files -> DataFrame(source_file, row_number, raw): non-blank lines, exact numbers."""
    from pyspark.sql import functions as F

    lines = _with_row_numbers(spark, spark.read.text(url))
    # The text source passes invalid UTF-8 through as-is (Arrow then refuses it); decoding in the
    # JVM turns bad bytes into U+FFFD, which clean_content rejects or keeps per data.invalid_utf8.
    lines = lines.withColumn("value", valid_utf8(F.col("value")))
    return lines.filter(~blank_line(F.col("value"))).select("source_file", "row_number", F.col("value").alias("raw"))


def valid_utf8(value):
    """A Column: ``value`` with each invalid UTF-8 sequence replaced by U+FFFD. Spark 4 has
    ``make_valid_utf8`` (and its ``decode`` raises on bad bytes); Spark 3.5's ``decode`` replaces."""
    from pyspark.sql import functions as F

    if hasattr(F, "make_valid_utf8"):
        return F.make_valid_utf8(value)
    return F.decode(value.cast("binary"), "UTF-8")


def blank_line(value):
    """A Column: is this line blank (``line_splits.is_blank`` is the same rule for lines Python
    reads itself). Blank lines are not records (Spark's CSV reader skips them
    too); numbers stay physical lines. Only a line that starts with a space can be blank but not
    empty: trim (which copies the line) and length (which counts every character) stay off the
    path of the other lines, where they were 1/6 of the JVM's time."""
    from pyspark.sql import functions as F

    return (value == "") | (value.startswith(" ") & (F.trim(value) == ""))


def read_text(spark, path: str, origin: str, data: DataConfig):
    """Zhang CSV (label + 1..3 text fields, no header) or named CSV/JSON/Parquet -> raw frame."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    _check_inputs(path, f"data.{origin}_path")
    url = fsutil.to_url(path)
    if is_line_mode(data):
        return _read_zhang_lines(spark, url, origin, data)
    if data.format == "zhang_csv":
        # Records may span lines (multiline): Spark's CSV reader, which is lenient about quotes.
        names = ["label"] + [f"f{i}" for i in range(1, data.num_fields)]
        schema = StructType([StructField(n, StringType()) for n in names] + [StructField("_corrupt", StringType())])
        df = (
            spark.read.schema(schema)
            .option("mode", "PERMISSIVE")
            .option("columnNameOfCorruptRecord", "_corrupt")
            .option("multiLine", data.multiline)
            .option("escape", '"')
            .option("encoding", data.encoding)
            .csv(url)
        )
        label_col, text_cols = "label", names[1:]
    else:
        label_col, text_cols = data.label_column, list(data.text_columns)
        reader = spark.read
        if data.format == "csv":
            reader = reader.option("header", True).option("multiLine", data.multiline).option("escape", '"')
        if data.format in ("csv", "json"):
            reader = reader.option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", "_corrupt")
            reader = reader.option("encoding", data.encoding)
        df = reader.format(data.format).load(url)
        missing = [c for c in [label_col, *text_cols] if c not in df.columns]
        if missing:
            raise UserError(
                f"{path}: column(s) {', '.join(missing)} not found (have: {', '.join(c for c in df.columns if c != '_corrupt')}); "
                "set data.label_column / data.text_columns"
            )
        if "_corrupt" not in df.columns:
            df = df.withColumn("_corrupt", F.lit(None).cast("string"))
        df = df.select(F.col(label_col).cast("string").alias("label"), *[F.col(c).cast("string") for c in text_cols], "_corrupt")
    # Spark refuses a query that reads only the corrupt-record column; we read them all.
    df = _with_row_numbers(spark, df)
    parts = F.array(*[F.col(c) for c in text_cols])
    raw = F.coalesce(F.col("_corrupt"), F.to_csv(F.struct(F.col("label"), *[F.col(c) for c in text_cols])))
    return df.select(
        F.lit(origin).alias("origin"),
        "source_file",
        "row_number",
        F.col("label").alias("label_raw"),
        F.when(F.col("_corrupt").isNull(), parts).alias("parts"),
        F.lit(None).cast("binary").alias("content"),
        raw.alias("raw"),
        F.when(F.col("_corrupt").isNotNull(), F.lit("malformed_record")).alias("reason"),
    )


# ---------------------------------------------------------------------------------------------
# idx (MNIST / Fashion-MNIST)
# ---------------------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def _open_maybe_gzip(url: str):
    fs, path = fsutil.fs_and_path(url)
    fh = fs.open(path, "rb")
    head = fh.read(2)
    fh.seek(0)
    return gzip.GzipFile(fileobj=fh) if head == b"\x1f\x8b" else fh


def idx_header(url: str) -> tuple[int, ...]:
    """Read and validate an idx header: (magic, count[, rows, cols])."""
    with _open_maybe_gzip(url) as fh:
        head = fh.read(16)
    if len(head) < 8:
        raise UserError(f"{url}: too short to be an idx file")
    magic, count = struct.unpack(">II", head[:8])
    if magic == IDX_IMAGES_MAGIC:
        if len(head) < 16:
            raise UserError(f"{url}: truncated idx image header")
        return (magic, count, *struct.unpack(">II", head[8:16]))
    if magic == IDX_LABELS_MAGIC:
        return (magic, count)
    raise UserError(f"{url}: idx magic number {magic}, expected {IDX_IMAGES_MAGIC} (images) or {IDX_LABELS_MAGIC} (labels)")


def parse_idx(data: bytes) -> np.ndarray:
    """idx bytes (optionally gzip) -> uint8 array [count] (labels) or [count, rows, cols]."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    magic, count = struct.unpack(">II", data[:8])
    if magic == IDX_LABELS_MAGIC:
        return np.frombuffer(data, dtype=np.uint8, count=count, offset=8)
    rows, cols = struct.unpack(">II", data[8:16])
    return np.frombuffer(data, dtype=np.uint8, count=count * rows * cols, offset=16).reshape(count, rows, cols)


def read_idx(spark, images_path: str, labels_path: str, origin: str, data: DataConfig):
    """idx image + label files -> raw frame. Decoded on executors from Spark's binaryFile rows."""
    from pyspark.sql import functions as F

    key = f"data.{origin}_path"
    if not labels_path:
        raise UserError(f"data.{origin}_labels_path is required with data.kind=idx (the *-labels-idx1-ubyte file)")
    img_url, lbl_url = _check_inputs(images_path, key)[0], _check_inputs(labels_path, f"data.{origin}_labels_path")[0]
    ih, lh = idx_header(img_url), idx_header(lbl_url)
    if ih[0] != IDX_IMAGES_MAGIC or lh[0] != IDX_LABELS_MAGIC:
        raise UserError(f"{key}: expected an images file then a labels file; swap data.{origin}_path and _labels_path")
    if ih[1] != lh[1]:
        raise UserError(f"{images_path} has {ih[1]} images but {labels_path} has {lh[1]} labels; use matching files")
    if data.image_channels != 1:
        raise UserError("idx images are grey: set data.image_channels=1")
    out_schema = "idx long, payload binary, source_file string"

    def explode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            for path, blob in zip(pdf["path"], pdf["content"], strict=False):
                arr = parse_idx(bytes(blob))
                flat = arr.reshape(arr.shape[0], -1)
                for start in range(0, flat.shape[0], 4096):
                    chunk = flat[start : start + 4096]
                    yield pd.DataFrame(
                        {
                            "idx": np.arange(start, start + chunk.shape[0], dtype=np.int64),
                            "payload": [row.tobytes() for row in chunk],
                            "source_file": path,
                        }
                    )

    images = spark.read.format("binaryFile").load(img_url).mapInPandas(explode, out_schema)
    labels = spark.read.format("binaryFile").load(lbl_url).mapInPandas(explode, out_schema)
    labels = labels.select("idx", F.conv(F.hex("payload"), 16, 10).alias("label_raw"))
    h, w = ih[2], ih[3]
    if (h, w) != (data.image_height, data.image_width):
        raise UserError(f"{images_path}: images are {h}x{w}; set data.image_height={h} data.image_width={w}")
    return images.join(labels, "idx").select(
        F.lit(origin).alias("origin"),
        "source_file",
        (F.col("idx") + 1).alias("row_number"),
        "label_raw",
        F.lit(None).cast("array<string>").alias("parts"),
        F.col("payload").alias("content"),
        F.concat(F.lit("idx item "), F.col("idx").cast("string")).alias("raw"),
        F.lit(None).cast("string").alias("reason"),
    )


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def image_files(spark, url: str):
    """PNG/JPEG files anywhere under ``url`` -> DataFrame(path, modificationTime, length,
    content). ``content`` is read only if selected, and only for files that pass filters on
    ``length`` (the binaryFile source applies them to the file's status first)."""
    return (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", True)
        .option("pathGlobFilter", "*.{png,PNG,jpg,JPG,jpeg,JPEG}")
        .load(url)
    )


def image_tasks(spark, files) -> int:
    """Tasks for decoding the files of an ``image_files`` frame: ~1,024 files each, and at least
    one per core.

    Spark packs small files 32 to a scan task (its 4 MB "open cost" apiece), and each Python
    task has a fixed cost: 4,000 images in 250 tasks took 22 s to score, in 4 tasks 2.5 s. The
    count grows with the input rather than being the cores at planning time, which under
    dynamic allocation may be a handful for a day of a million images.
    """
    return max(spark.sparkContext.defaultParallelism, -(-files.rdd.getNumPartitions() // 32))


def read_image_folder(spark, path: str, origin: str, data: DataConfig):
    """<path>/<class>/<image>.{png,jpg,jpeg} -> raw frame, decoded and resized on executors."""
    from pyspark.sql import functions as F

    from dl_pipeline.features import decode_images, image_spec

    _check_inputs(path, f"data.{origin}_path")
    spec = image_spec(data)
    files = image_files(spark, fsutil.to_url(path)).select("path", "content")
    files = files.coalesce(image_tasks(spark, files))

    def decode(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            pixels = decode_images(pdf["content"], spec)
            yield pd.DataFrame({"path": pdf["path"], "pixels": [None if p is None else p.tobytes() for p in pixels],
                                "reason": [("undecodable_image" if p is None else None) for p in pixels]})

    decoded = files.mapInPandas(decode, "path string, pixels binary, reason string")
    return decoded.select(
        F.lit(origin).alias("origin"),
        F.col("path").alias("source_file"),
        F.lit(None).cast("long").alias("row_number"),
        F.regexp_extract("path", r"([^/]+)/[^/]+$", 1).alias("label_raw"),
        F.lit(None).cast("array<string>").alias("parts"),
        F.col("pixels").alias("content"),
        F.col("path").alias("raw"),
        "reason",
    )


def _estimate_file_rows(url: str, fmt: str, sample_bytes: int = 1 << 20) -> int:
    """Records in one file, estimated from its size and the newlines in its first MiB. Raises
    line_splits.BrokenFile for a gzip file whose first MiB cannot be read.

    Leans high (a multi-line record counts once per line): the estimate only sizes row groups.
    For gzip the ratio is taken per compressed byte consumed, so no full decompression.
    """
    import pyarrow.parquet as pq

    fs, path = fsutil.fs_and_path(url)
    if fmt == "parquet":
        with fs.open(path, "rb") as fh:
            return pq.read_metadata(fh).num_rows
    from dl_pipeline.line_splits import gzip_read, is_gzip

    size = fs.size(path)
    with fs.open(path, "rb") as fh:
        if not is_gzip(url):  # by name, as Hadoop's codec factory (and so every reader here) decides
            sample = fh.read(sample_bytes)
            used = len(sample)
        else:
            with gzip_read(url), gzip.GzipFile(fileobj=fh) as unz:
                sample = unz.read(sample_bytes)
            used = max(1, fh.tell())
    if not sample:
        return 0
    lines = sample.count(b"\n") + (0 if sample.endswith(b"\n") else 1)
    if used >= size:
        return lines
    return int(lines * size / used) + 1


def estimate_rows(data: DataConfig) -> int:
    """Input records across the configured inputs, without a Spark job (see _estimate_file_rows)."""
    total = 0
    for path in (data.train_path, data.test_path):
        if not path:
            continue
        files = fsutil.expand(path)
        if data.kind == "idx":
            total += sum(idx_header(u)[1] for u in files[:1])
        elif data.kind == "image_folder":
            total += len(files)
        else:
            total += sum(_estimate_file_rows(u, data.format) for u in files)
    return total


def read_raw(spark, data: DataConfig):
    """All configured inputs (train, and test if given) as one raw frame."""
    frames = []
    for origin, path, labels in (("train", data.train_path, data.train_labels_path), ("test", data.test_path, data.test_labels_path)):
        if not path:
            if origin == "train":
                raise UserError("data.train_path is not set: pass --set data.train_path=... or set it in the config file")
            continue
        if data.kind == "text":
            frames.append(read_text(spark, path, origin, data))
        elif data.kind == "idx":
            frames.append(read_idx(spark, path, labels, origin, data))
        else:
            frames.append(read_image_folder(spark, path, origin, data))
    out = frames[0]
    for f in frames[1:]:
        out = out.unionByName(f)
    return out
