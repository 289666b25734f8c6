"""prepare's executor code: its two passes, each a Python task that reads and writes files
itself. Spark schedules them, and reads the inputs Python does not read itself.

**Spill** (one task per input split, or per partition of a frame Spark read): the label rule and
the text rule set (``features.check_record``) decide each record's reject reason; rejects go to
``_spill/rejects-<task>.arrow``; the other rows get their content hash (``features.content_hashes``)
and are written to ``_spill/part-<task>.arrow``, one Arrow IPC record batch per row group they
fall in. A row's group is a function of its content and the seed alone (``row_groups_of``).
A line split's rows are numbered from its first line, and its task reports its lines: the
driver works out each split's place in its file from those (``prepare.spill``).

**Write** (one task per share of the row groups): a group's batches from every spill file are all
the copies of its texts, so duplicates are decided there: same content, different labels ->
every copy ``conflicting_labels``; exact copies -> the first by (file, row number) kept, the rest
``duplicate`` (both per origin: the test file keeps all its rows). The kept rows get their split
(content and seed), are ordered by a seeded hash of their content, featurized and written as
``<split>/part-<group>.parquet``; that task's duplicates and conflicts, and the spill tasks'
rejects in its share, go to ``rejects/part-w<task>.parquet``, row numbers made whole.

This is the data path's one shuffle, done in Python: a row crosses into the JVM never, and is
written and read once more (read, not mapped: _SpillFiles), in the layout the writer needs.
(Spark's own shuffle, sort and window on whole rows, with the Arrow transfers to and from it,
cost prepare ~20 CPU-us a row: bench/README.md.) Every output depends on the rows alone, so shards are byte-identical on
any cluster and on a retried task.

Driver code: ``prepare.py``. What travels to tasks: a ``PrepareTask`` and plain values.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from dl_pipeline import dataset, fsutil
from dl_pipeline.testhooks import wait_to_be_killed

RAW_LIMIT = 4096  # characters of the raw record kept in rejects/
SPILL_DIR = "_spill"
ORIGINS = ("train", "test")
# Rows of a task's report: ("spill", file, group, batch index, rows) for each batch spilled,
# ("file", split, group, file name, rows) for each shard file, ("count", status, reason, split,
# label, rows) for what the driver sums into the manifest's counts.
REPORT_FIELDS = ("kind", "split", "grp", "file", "batch", "status", "reason", "label", "n")
REPORT_DDL = ("kind string, split string, grp int, file string, batch int, status string, reason string, "
              "label int, n long")


@dataclass(frozen=True)
class PrepareTask:
    """What every spill and write task gets: the rules' settings and where to write."""

    root: str  # URL of this run's directory: <root>/{train,val,test,rejects,_spill}
    spec: dict  # the featurizer spec (features.text_spec / image_spec)
    groups: int  # row groups a split may have (prepare.choose_row_groups)
    seed: int
    val_fraction: float
    test_cut: float  # shard.test_fraction, or 0 when a test file is given
    num_classes: int
    label_base: int
    class_names: tuple[str, ...] | None  # image folders: the sorted class names labels index
    num_fields: int
    separator: str
    max_chars: int
    reject_invalid_utf8: bool
    flush_bytes: int = 128 << 20  # kept rows a spill task holds before it writes them out (see Spill)
    inject_failure: bool = False  # test hook: every write task's first attempt dies after its first group
    pause_dir: str = ""  # test hook: write task 0's first attempt waits there to be killed

    def __post_init__(self) -> None:
        if self.groups < 1 or self.num_classes < 1 or self.flush_bytes < 1:
            raise ValueError(f"PrepareTask: groups, num_classes and flush_bytes must be >= 1, got {self.groups}, "
                             f"{self.num_classes}, {self.flush_bytes}")
        if not (0 <= self.test_cut and 0 <= self.val_fraction and self.test_cut + self.val_fraction < 1):
            raise ValueError(f"PrepareTask: need 0 <= test_cut, val_fraction and a sum < 1, got {self.test_cut}, {self.val_fraction}")


# ---------------------------------------------------------------------------------------------
# The rules that follow the content hash
# ---------------------------------------------------------------------------------------------

# Recorded in the manifest (``row_rules``): which rows get which ids, splits, groups and places.
# /2 (2026-12-06): from ``features.content_hashes`` (word64) through ``_mix``; /1 used Spark's
# hash of the row. The files' layout did not change (``dataset.FORMAT``), but a dataset prepared
# again under /2 puts rows in other val/train splits: compare models only on one rule's splits.
ROW_RULES = "dl_pipeline.rows/2"
_U64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_GROUP, _ORDER, _SPLIT = 1, 2, 3  # one salt each, so a row's group, place and split are independent


def _mix(h: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """uint64 [n] -> uint64 [n]: h xor a salt made from the seed, through MurmurHash3's finalizer."""
    from dl_pipeline.text_kernel import FMIX1, FMIX2

    x = h ^ np.uint64((seed * _GOLDEN + salt * 0xD6E8FEB86659FD93) & _U64)
    x ^= x >> np.uint64(33)
    x *= np.uint64(FMIX1)
    x ^= x >> np.uint64(33)
    x *= np.uint64(FMIX2)
    return x ^ (x >> np.uint64(33))


def row_groups_of(h: np.ndarray, seed: int, groups: int) -> np.ndarray:
    """Content hashes uint64 [n] -> row group int64 [n] in 0..groups-1 (near-equal groups)."""
    return ((_mix(h, seed, _GROUP) >> np.uint64(32)) * np.uint64(groups) >> np.uint64(32)).astype(np.int64)


def order_keys(h: np.ndarray, seed: int) -> np.ndarray:
    """Content hashes -> uint64 [n]: the rows' order inside a row group (random, reproducible)."""
    return _mix(h, seed, _ORDER)


def split_codes(h: np.ndarray, from_test_file: np.ndarray, task: PrepareTask) -> np.ndarray:
    """Content hashes, and whether each row came from the test file -> index into
    ``dataset.SPLITS`` per row: a function of content and seed, so stable when rows are added."""
    u = (_mix(h, task.seed, _SPLIT) >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform [0, 1)
    names = list(dataset.SPLITS)
    code = np.where(u < task.test_cut, names.index("test"),
                    np.where(u < task.test_cut + task.val_fraction, names.index("val"), names.index("train")))
    return np.where(from_test_file, names.index("test"), code)


def row_ids(h: np.ndarray):
    """Content hashes -> the shards' ``row_id``: 16 lower-case hex digits each (Arrow strings
    made from one buffer, no Python object per row)."""
    import pyarrow as pa

    text = h.astype(">u8").tobytes().hex().encode("ascii")
    offsets = np.arange(0, 16 * (len(h) + 1), 16, dtype=np.int32)
    return pa.StringArray.from_buffers(len(h), pa.py_buffer(offsets.tobytes()), pa.py_buffer(text))


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------

_INTEGER = re.compile(r"[+-]?[0-9]{1,9}")


def label_of(raw: str | None, task: PrepareTask) -> tuple[int | None, str | None]:
    """A raw label -> (0-based label, None) or (None, reject reason). Spaces around it are
    ignored. Integers base..base+K-1, or (image folders) one of the class names."""
    value = None if raw is None else raw.strip(" ")
    if task.class_names is not None:
        if value in task.class_names:
            return task.class_names.index(value), None
        return None, "label_unknown"
    if value is None or not _INTEGER.fullmatch(value):
        return None, "label_not_integer"
    label = int(value) - task.label_base
    if not 0 <= label < task.num_classes:
        return None, "label_out_of_range"
    return label, None


# ---------------------------------------------------------------------------------------------
# Pass 1: spill
# ---------------------------------------------------------------------------------------------


def spill_schema(spec: dict[str, Any]):
    """The spill files' columns: the content hash, the row's label and origin, what rejects and
    de-duplication need (file, row number, the raw record or where it lies in the file), and the
    value to featurize. A line whose place in its file is known (``raw_start``, ``raw_end``: bytes)
    keeps no text: the few that turn out duplicates are read back (``line_splits.read_back``),
    which spares the spill ~41% of its bytes (AG News: 574 -> 340 a row)."""
    import pyarrow as pa

    # Large (64-bit offset) strings: a row group's or a flush's text may pass 2 GiB.
    value = pa.large_string() if spec["kind"] == "text" else pa.large_binary()
    return pa.schema([("h", pa.uint64()), ("label", pa.int32()), ("origin", pa.string()), ("source_file", pa.string()),
                      ("row_number", pa.int64()), ("raw", pa.large_string()), ("raw_start", pa.int64()),
                      ("raw_end", pa.int64()), ("value", value)])


def rejects_schema():
    import pyarrow as pa

    return pa.schema([("origin", pa.string()), ("source_file", pa.string()), ("row_number", pa.int64()),
                      ("raw", pa.string()), ("reason", pa.string())])


class Spill:
    """One spill task: ``add`` records batch by batch, then ``finish`` -> its report rows.

    Rejects are written as they come; kept rows are held (Arrow, ~0.35 KB an AG News row) up to
    ``task.flush_bytes`` at a time, then written sorted by row group, one batch per group
    present: a task's memory is bounded by that, not by its input (a gzip file, or a frame
    partition Spark read, is one task whatever its size). Both files appear only when whole (``_write_atomic``):
    a retried task writes the same names with the same bytes."""

    def __init__(self, task: PrepareTask, index: int):
        dataset.use_mimalloc()
        self.task, self.index = task, index
        self.kept: list[Any] = []
        self.kept_bytes = 0
        self.counts: collections.Counter = collections.Counter()
        self.files = contextlib.ExitStack()
        self.rejects = None  # the rejects' Arrow IPC writer (the write pass publishes them: write_groups)
        self.rejected = 0
        self.spilled = None  # the spill file's Arrow IPC writer, opened at the first flush
        self.batches: list[dict[str, Any]] = []  # report rows of the batches written

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *failed) -> None:
        self.files.__exit__(*failed)  # after an error the rejects file is not published

    def add(self, origin: Sequence[str], source_file: Sequence[str], row_number: Any, label_raw: Sequence[str | None],
            reason: Sequence[str | None], value: Any, value_reason: Sequence[str | None], raw: Sequence[str | None],
            raw_at: np.ndarray | None = None) -> None:
        """A batch of n records, as columns: where it came from (``row_number`` int64 [n], null
        allowed), its raw label, why it failed to parse (or None), its value (cleaned text or
        pixel bytes; a list or an Arrow array), why its value is rejected (``check_record``'s
        reason, or None) and the raw record (for rejects). Reasons take precedence in that order:
        parsing, label, value. ``raw_at``: int64 [n, 2], each record's byte range in
        ``source_file`` where it is one line read back as it is (-1 where not): a kept record
        located there is spilled without its text."""
        import pyarrow as pa
        import pyarrow.compute as pc

        labels, reasons, seen = [], [], {}
        for lab, why, value_why in zip(label_raw, reason, value_reason, strict=True):
            decided = seen.get(lab)
            if decided is None:
                decided = seen[lab] = label_of(lab, self.task)
            if why is None:
                why = decided[1]
            labels.append(decided[0] if why is None else None)
            reasons.append(why if why is not None else value_why)
        value_type = spill_schema(self.task.spec).field("value").type
        if raw_at is not None:  # text only where it cannot be read back, or for this task's rejects
            raw = [r if at < 0 or why is not None else None for r, at, why in zip(raw, raw_at[:, 0], reasons, strict=True)]
        rows = pa.table({
            "label": pa.array(labels, pa.int32()), "origin": _column(origin, len(labels)),
            "source_file": _column(source_file, len(labels)), "row_number": row_number.cast(pa.int64()) if isinstance(row_number, pa.Array) else pa.array(row_number, pa.int64()),
            "raw": raw.cast(pa.large_string()) if isinstance(raw, pa.Array) else pa.array(raw, pa.large_string()),
            **_ranges(raw_at, len(labels)),
            "reason": pa.array(reasons, pa.string()),
            "value": value.cast(value_type) if isinstance(value, pa.Array) else pa.array(value, value_type),
        })
        if rows.column("reason").null_count != rows.num_rows:
            bad = rows.filter(pc.is_valid(rows.column("reason")))
            self._reject(bad)
            rows = rows.filter(pc.is_null(rows.column("reason")))
        if rows.num_rows:
            from dl_pipeline.features import content_hashes

            h = content_hashes(rows.column("value").combine_chunks())
            self.kept.append(rows.drop(["reason"]).append_column("h", pa.array(h, pa.uint64())))
            self.kept_bytes += self.kept[-1].nbytes
            if self.kept_bytes >= self.task.flush_bytes:
                self._flush()

    def _reject(self, bad) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        for (reason, label), n in _tally(bad.column("reason").to_pylist(), bad.column("label").to_pylist()).items():
            self.counts[("rejected", reason, None, label)] += n
        if self.rejects is None:
            sink = self.files.enter_context(_write_atomic(fsutil.join(self.task.root, SPILL_DIR, rejects_name(self.index))))
            self.rejects = self.files.enter_context(pa.ipc.new_file(sink, rejects_schema()))
        raw = pc.utf8_slice_codeunits(bad.column("raw"), 0, RAW_LIMIT).cast(pa.string())
        self.rejects.write_table(pa.table({"origin": bad.column("origin"), "source_file": bad.column("source_file"),
                                           "row_number": bad.column("row_number"), "raw": raw, "reason": bad.column("reason")},
                                          schema=rejects_schema()))
        self.rejected += bad.num_rows

    def _flush(self) -> None:
        """Write the rows held so far to the spill file, one batch per row group present."""
        import pyarrow as pa

        if not self.kept:
            return
        schema = spill_schema(self.task.spec)
        rows = pa.concat_tables(self.kept).select(schema.names).cast(schema)
        self.kept, self.kept_bytes = [], 0
        group = row_groups_of(rows.column("h").to_numpy(), self.task.seed, self.task.groups)
        order = np.argsort(group, kind="stable")
        rows, group = rows.take(pa.array(order)), group[order]
        starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        name = spill_name(self.index)
        if self.spilled is None:
            sink = self.files.enter_context(_write_atomic(fsutil.join(self.task.root, SPILL_DIR, name)))
            self.spilled = self.files.enter_context(pa.ipc.new_file(sink, schema))
        for lo, hi in zip(starts, [*starts[1:], len(group)], strict=True):
            self.spilled.write_batch(rows.slice(lo, hi - lo).combine_chunks().to_batches()[0])
            self.batches.append({"kind": "spill", "file": name, "grp": int(group[lo]), "batch": len(self.batches),
                                 "n": int(hi - lo)})

    def finish(self) -> list[dict[str, Any]]:
        """Write the rows still held, publish the spill and rejects files (in ``SPILL_DIR``) -> this task's report rows."""
        self._flush()
        self.files.close()
        rejects = [{"kind": "rejects", "file": rejects_name(self.index), "n": self.rejected}] if self.rejected else []
        return _count_rows(self.counts) + self.batches + rejects


def spill_name(index: int) -> str:
    """Spill task ``index``'s kept rows, in ``SPILL_DIR``."""
    return f"part-{index:05d}.arrow"


def rejects_name(index: int) -> str:
    """Spill task ``index``'s rejects, in ``SPILL_DIR`` until a write task publishes them."""
    return f"rejects-{index:05d}.arrow"


def _ranges(at: np.ndarray | None, n: int) -> dict[str, Any]:
    """int64 [n, 2] byte ranges (-1: none), or None -> the spill's raw_start and raw_end
    columns, null where none."""
    import pyarrow as pa

    if at is None:
        return {"raw_start": pa.nulls(n, pa.int64()), "raw_end": pa.nulls(n, pa.int64())}
    none = at[:, 0] < 0
    return {"raw_start": pa.array(at[:, 0], pa.int64(), mask=none), "raw_end": pa.array(at[:, 1], pa.int64(), mask=none)}


def _column(values: str | Any, n: int):
    """A string column: ``values`` as given, or one string repeated n times."""
    import pyarrow as pa

    if isinstance(values, str):
        return pa.repeat(pa.scalar(values, pa.string()), n)
    return values.cast(pa.string()) if isinstance(values, pa.Array) else pa.array(values, pa.string())


def _tally(*columns: Iterable) -> collections.Counter:
    return collections.Counter(zip(*columns, strict=True))


@contextlib.contextmanager
def _write_atomic(url: str):
    """A binary file at ``url`` that appears, whole, only when the block ends without error."""
    fs, path = fsutil.fs_and_path(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = dataset.temp_name(path)
    with fs.open(tmp, "wb") as fh:
        yield fh
    fs.mv(tmp, path)


@contextlib.contextmanager
def as_task():
    """A task's process settings while it runs.

    Python's cyclic garbage collector is off: parsing holds ~130k container objects per 16 MB
    chunk (result tuples, field lists) and the collector walked them over and over: a spill
    task took 14.7 CPU-us/row with it and 10.3 without (100k AG News rows, best of 5). Tasks
    make no reference cycles of their own, and the worker collects after each task (pyworker).

    After it, Arrow's pool hands its free memory back to the OS: a reused worker runs ~20 tasks
    of a 10M-row job, and its resident memory should be one task's, not what the allocator kept
    of all of them."""
    import pyarrow as pa

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        pa.default_memory_pool().release_unused()


def spill_lines(split, origin: str, index: int, task: PrepareTask) -> list[dict[str, Any]]:
    """Spill task over a ``line_splits.LineSplit`` of a line-mode Zhang CSV (its lines read by
    this task) -> report rows, with ("lines", its physical lines as ``n``, ``index`` as
    ``batch``), or only ("broken", the message as ``reason``) for a broken file.

    Its rows are numbered from the split's first line (1): the split's place in its file is
    known only once the splits before it are read, so the write pass adds it (``WriteShare``).
    Counting every split's lines first, in a pass of its own, cost the job ~5 s in 290 at 10M
    rows, with both cores reading the whole input once more."""
    from dl_pipeline.line_splits import BrokenFile

    try:
        with as_task(), Spill(task, index) as spill:
            lines = _spill_lines_into(spill, split, origin, task)
            return [*spill.finish(), {"kind": "lines", "batch": index, "n": lines}]
    except BrokenFile as exc:  # what the task wrote is not published (Spill.__exit__)
        return [{"kind": "broken", "reason": str(exc), "n": 0}]


def _spill_lines_into(spill: Spill, split, origin: str, task: PrepareTask) -> int:
    """-> the split's physical lines."""
    from dl_pipeline.line_splits import read_lines
    from dl_pipeline.sources import LineRecords, Records

    records = LineRecords(task.num_fields, task.separator, task.max_chars, task.reject_invalid_utf8)
    waiting: list[np.ndarray] = []  # int64 [n, 3] per piece: row number, then the byte range (-1 when not located)
    lines: list[str] = []

    def add(results: Records) -> None:
        # Results answer the lines fed, in order, possibly lagging: the first len(results) waiting.
        nonlocal lines
        n = len(results)
        if not n:
            return
        ahead = np.concatenate(waiting) if len(waiting) > 1 else waiting[0]
        waiting[:] = [ahead[n:]]
        raw, lines, at = lines[:n], lines[n:], ahead[:n]
        if results.record is None:  # every line parsed on its own: the usual piece
            columns, spans = [results.label, results.reason, results.text, results.text_reason], at[:, 1:]
        else:
            columns, raw, at, spans = _one_row_per_record(results, raw, at)
        spill.add(origin, split.url, at[:, 0], *columns, raw, spans)

    # Lines are read back (duplicates, for rejects/) from a local file only: a read a line is
    # ~3 CPU-us there, a ranged request (or a block cache's fill) from an object store.
    local = fsutil.local_path(split.url) is not None
    physical = 0
    for piece_numbers, piece_lines, spans, piece_physical in read_lines(split, 1, located=True):
        located = np.full((len(piece_lines), 2), -1, np.int64) if spans is None or not local else spans
        waiting.append(np.column_stack([piece_numbers, located]))
        lines += piece_lines
        physical += piece_physical
        add(records.feed([split.url] * len(piece_lines), piece_lines))
    add(records.finish())
    return physical


def _one_row_per_record(results, raw: list[str], at: np.ndarray) -> tuple[list[list], list[str], np.ndarray, np.ndarray]:
    """``sources.Records`` of m lines with a reject or a record of several lines among them, the
    lines ``raw`` [m] and where they are ``at`` int64 [m, 3] -> (``Spill.add``'s four result
    columns, raw records, ``at`` and byte ranges int64 [k, 2]) of the k records: a record's other
    lines (``CONTINUATION``) leave, and a record of several lines keeps its text (there is no one
    line to read back)."""
    from dl_pipeline.sources import CONTINUATION

    keep = [i for i, why in enumerate(results.reason) if why != CONTINUATION]
    columns = [[c[i] for i in keep] for c in (results.label, results.reason, results.text, results.text_reason)]
    record = [results.record[i] for i in keep]
    raw = [raw[i] if rec is None else rec for i, rec in zip(keep, record, strict=True)]
    at = at[keep]
    spans = at[:, 1:].copy()
    spans[[rec is not None for rec in record]] = -1
    return columns, raw, at, spans


def spill_frame(task: PrepareTask):
    """The function ``mapInArrow`` runs over a raw frame Spark read (``sources.read_raw``'s
    columns) -> report batches (``REPORT_DDL``)."""

    def run(batches):
        from pyspark import TaskContext

        with as_task(), Spill(task, TaskContext.get().partitionId()) as spill:
            report = _spill_batches(batches, spill)
        yield _report_batch(report)

    def _spill_batches(batches, spill: Spill) -> list[dict[str, Any]]:
        from dl_pipeline.features import check_record

        for batch in batches:
            if not batch.num_rows:
                continue
            col = {name: batch.column(name) for name in batch.schema.names}
            n = batch.num_rows
            if task.spec["kind"] != "text":
                value, value_reason = col["content"], [None] * n
            elif "text_reason" in col:  # checked and cleaned while parsing (line-mode CSV)
                value, value_reason = col["text"], col["text_reason"].to_pylist()
            else:  # fields split by Spark's reader: the same rule set
                checked = [check_record(p, task.separator, task.max_chars, task.reject_invalid_utf8)
                           for p in col["parts"].to_pylist()]
                value_reason, value = (list(c) for c in zip(*checked, strict=True))
            spill.add(col["origin"], col["source_file"], col["row_number"], col["label_raw"].to_pylist(),
                      col["reason"].to_pylist(), value, value_reason, col["raw"])
        return spill.finish()

    return run


def _report_batch(rows: list[dict[str, Any]]):
    import pyarrow as pa

    schema = pa.schema([("kind", pa.string()), ("split", pa.string()), ("grp", pa.int32()), ("file", pa.string()),
                        ("batch", pa.int32()), ("status", pa.string()), ("reason", pa.string()), ("label", pa.int32()),
                        ("n", pa.int64())])
    return pa.RecordBatch.from_pylist(rows, schema=schema)


# ---------------------------------------------------------------------------------------------
# Pass 2: de-duplicate, split, order, featurize, write
# ---------------------------------------------------------------------------------------------

OK, DUPLICATE, CONFLICT = 0, 1, 2
# A shard file (one row group) is built from tables of this many rows: Parquet's writer sizes its
# buffers (a definition and a repetition level per list value) by the chunk, so ~30k-row chunks
# took fresh pages from the OS every file (2.6 page faults a row): 19.6 CPU-us/row to featurize
# and write, against 16.0 in 4,096-row chunks (64k AG News rows, mimalloc).
WRITE_CHUNK_ROWS = 4096


def decide(rows, h: np.ndarray, test: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A row group's spilled rows (all copies of their contents; their content hashes ``h``
    uint64 [n], whether each came from the test file ``test`` bool [n], ``labels`` int32 [n])
    -> status int8 [n]: OK, DUPLICATE or CONFLICT. Copies are rows with equal content hash and
    origin: all of them CONFLICT where their labels differ, else the first (``_first_copies``)
    OK and the rest DUPLICATE. ``rows`` (the spilled table, chunks as read) is looked at for
    copies only.

    Column-wise, copies included: a ``min`` over each set of copies, reading their keys a
    scalar at a time, cost ~29 CPU-us a copy, 2.7-3.2 us/row of a group where 5% of the rows
    repeat, as 10M resampled AG News rows do (0.5% at 1M)."""
    status = np.zeros(len(h), np.int8)
    order = np.lexsort((test, h))
    hs, ts = h[order], test[order]
    same = (hs[1:] == hs[:-1]) & (ts[1:] == ts[:-1])
    if not same.any():
        return status
    starts = np.flatnonzero(np.r_[True, ~same])
    sizes = np.diff(np.r_[starts, len(h)])
    copied = np.repeat(sizes > 1, sizes)  # per place in order: its content has copies
    copies, sets = order[copied], np.repeat(np.arange(len(starts)), sizes)[copied]
    firsts = np.flatnonzero(np.r_[True, sets[1:] != sets[:-1]])  # where each set of copies starts
    label_of_copy = labels[copies]
    conflict = np.minimum.reduceat(label_of_copy, firsts) != np.maximum.reduceat(label_of_copy, firsts)
    conflict = np.repeat(conflict, np.diff(np.r_[firsts, len(copies)]))
    status[copies] = np.where(conflict, CONFLICT, DUPLICATE)
    status[_first_copies(rows, copies[~conflict], sets[~conflict])] = OK
    return status


def _first_copies(rows, copies: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """Rows ``copies`` int [m] of ``rows``, ``sets`` int [m] (ascending: which set of copies each
    is in) -> the row kept of each set: the first by file, then row number (none last), then raw
    record (where spilled: a line kept as its byte range has a row number of its own in its
    file), then place in ``copies``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not len(copies):
        return copies
    of = rows.select(["source_file", "row_number", "raw"]).take(pa.array(copies))
    number = of.column("row_number")
    keys = pa.table({"set": sets, "file": of.column("source_file").fill_null(""), "none": number.is_null(),
                     "number": number.fill_null(0), "raw": of.column("raw").fill_null(""), "at": np.arange(len(copies))})
    ranked = pc.sort_indices(keys, sort_keys=[(name, "ascending") for name in keys.column_names]).to_numpy()
    ranked_sets = sets[ranked]
    return copies[ranked[np.r_[True, ranked_sets[1:] != ranked_sets[:-1]]]]


def _from_test_file(rows) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.equal(rows.column("origin"), "test").to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class WriteShare:
    """What one write task gets: its row groups (ascending), each one's spilled batches
    ((spill file, batch index) each), the spill tasks' rejects files it publishes, and the
    number to add to the row numbers read from each file (a line split's rows are numbered
    from its first line: ``spill_lines``)."""

    groups: tuple[int, ...]
    sources: dict[int, list[tuple[str, int]]]
    rejects: tuple[str, ...] = ()
    offsets: dict[str, int] = field(default_factory=dict)


class _SpillFiles:
    """The spill files a write task reads, the last ``MAX_OPEN`` of them kept open (a job may
    have thousands), their rows numbered in their files (``WriteShare.offsets``). Read, not
    memory-mapped: a mapped file's pages count in the task's resident memory as it reads on
    (3.8 GB at 10M rows), for no CPU saved."""

    MAX_OPEN = 128

    def __init__(self, root: str, offsets: dict[str, int]):
        self.root, self.offsets, self.open = root, offsets, {}

    def batch(self, name: str, index: int):
        """Batch ``index`` of spill file ``name``, its row numbers in their file."""
        batch = self._reader(name).get_batch(index)
        offset = self.offsets.get(name, 0)
        if not offset:
            return batch
        import pyarrow as pa
        import pyarrow.compute as pc

        columns = batch.columns
        at = batch.schema.get_field_index("row_number")
        columns[at] = pc.add(columns[at], offset)
        return pa.RecordBatch.from_arrays(columns, schema=batch.schema)

    def batches(self, name: str):
        """All of spill file ``name``'s batches, in order."""
        for i in range(self._reader(name).num_record_batches):
            yield self.batch(name, i)

    def _reader(self, name: str):
        import pyarrow as pa

        if name not in self.open:
            if len(self.open) >= self.MAX_OPEN:
                self.open.pop(next(iter(self.open)))[1].close()  # the oldest
            url = fsutil.join(self.root, SPILL_DIR, name)
            local = fsutil.local_path(url)
            if local:
                source = pa.OSFile(local)
            else:
                fs, path = fsutil.fs_and_path(url)
                source = fs.open(path, "rb")
            self.open[name] = pa.ipc.open_file(source), source
        return self.open[name][0]


def write_groups(index: int, share: WriteShare, task: PrepareTask) -> list[dict[str, Any]]:
    """Write task ``index``: for each of its share's groups, that group's spilled batches ->
    shard files and rejects; then the spill tasks' rejects it was given -> rejects; -> report rows."""
    with as_task():
        return _write_groups(index, share, task)


def _write_groups(index: int, share: WriteShare, task: PrepareTask) -> list[dict[str, Any]]:
    import pyarrow as pa
    from pyspark import TaskContext

    dataset.use_mimalloc()
    context = TaskContext.get()
    first_attempt = context is None or context.attemptNumber() == 0
    spills = _SpillFiles(task.root, share.offsets)
    schema = dataset.arrow_schema(task.spec)
    report: list[dict[str, Any]] = []
    counts: collections.Counter = collections.Counter()
    with contextlib.ExitStack() as files:  # on an exception the rejects file is not published
        rejects = None

        def rejects_file():
            nonlocal rejects
            if rejects is None:
                url = fsutil.join(task.root, "rejects", f"part-w{index:05d}.parquet")
                rejects = files.enter_context(dataset.parquet_file(url, rejects_schema(), compression="snappy"))
            return rejects

        for done, group in enumerate(share.groups):
            rows = pa.Table.from_batches([spills.batch(name, b) for name, b in share.sources[group]])
            # The values as one array (take() on a chunked column concatenates it every call);
            # the raw records and where they came from stay as read, for the few rejects.
            values = rows.column("value").combine_chunks()
            h, labels = rows.column("h").to_numpy(), rows.column("label").to_numpy()
            test = _from_test_file(rows)
            status = decide(rows, h, test, labels)
            split = split_codes(h, test, task)
            for s, name in enumerate(dataset.SPLITS):
                take = np.flatnonzero((status == OK) & (split == s))
                if not len(take):
                    continue
                take = take[np.lexsort((test[take], order_keys(h[take], task.seed)))]
                table = pa.concat_tables(_featurized(values, labels, h, take[lo : lo + WRITE_CHUNK_ROWS], task.spec, schema)
                                         for lo in range(0, len(take), WRITE_CHUNK_ROWS))
                file = f"part-{group:05d}.parquet"
                dataset.write_row_group(fsutil.join(task.root, name, file), table)
                report.append({"kind": "file", "split": name, "grp": group, "file": file, "n": table.num_rows})
                for label, n in zip(*np.unique(labels[take], return_counts=True), strict=True):
                    counts[("ok", None, name, int(label))] += int(n)
            bad = np.flatnonzero(status != OK)
            if len(bad):
                rejects_file().write_table(_rejected(_take_chunked(rows, bad), status[bad]))
                for st, label in zip(status[bad], labels[bad], strict=True):
                    key = ("duplicate", "duplicate") if st == DUPLICATE else ("rejected", "conflicting_labels")
                    counts[(*key, None, int(label))] += 1
            if not done and first_attempt and task.inject_failure:  # its first group written, a task may have one
                raise RuntimeError("injected prepare failure")
            if not done and first_attempt and task.pause_dir and index == 0:
                wait_to_be_killed(task.pause_dir)
        for name in share.rejects:  # counted by the spill task that found them
            for batch in spills.batches(name):
                rejects_file().write_batch(batch)
    return report + _count_rows(counts)


def _featurized(values, labels: np.ndarray, h: np.ndarray, take: np.ndarray, spec: dict[str, Any], schema):
    """Rows ``take`` of a group's spilled rows (``values`` one array, ``labels`` and content
    hashes ``h`` [n]) -> a table of the dataset's ``schema``."""
    import pyarrow as pa

    from dl_pipeline.features import encoded_features

    return pa.table({"row_id": row_ids(h[take]), "label": pa.array(labels[take], pa.int32()),
                     **encoded_features(values.take(pa.array(take)), spec)}, schema=schema)


def _take_chunked(rows, index: np.ndarray):
    """Rows ``index`` (ascending) of a table whose columns are chunked alike (batches as read)
    -> a table, taken chunk by chunk: Table.take would concatenate every column whole first."""
    import pyarrow as pa

    batches = rows.to_batches()
    ends = np.cumsum([b.num_rows for b in batches])
    pieces, lo = [], 0
    for batch, end in zip(batches, ends, strict=True):
        hi = int(np.searchsorted(index, end))
        if hi > lo:
            pieces.append(batch.take(pa.array(index[lo:hi] - (end - batch.num_rows))))
        lo = hi
    return pa.Table.from_batches(pieces, schema=rows.schema)


def _count_rows(counts: collections.Counter) -> list[dict[str, Any]]:
    """{(status, reason, split, label): rows} -> report rows."""
    return [{"kind": "count", "status": s, "reason": r, "split": p, "label": lab, "n": n} for (s, r, p, lab), n in counts.items()]


def _rejected(rows, status: np.ndarray):
    import pyarrow as pa
    import pyarrow.compute as pc

    reason = pa.array(np.where(status == DUPLICATE, "duplicate", "conflicting_labels").tolist(), pa.string())
    return pa.table({"origin": rows.column("origin"), "source_file": rows.column("source_file"),
                     "row_number": rows.column("row_number"),
                     "raw": pc.utf8_slice_codeunits(_raw_records(rows), 0, RAW_LIMIT).cast(pa.string()),
                     "reason": reason}, schema=rejects_schema())


def _raw_records(rows):
    """Spilled rows -> their raw records: as spilled, or read back from their file where the
    spill kept only the byte range (``spill_schema``)."""
    import pyarrow as pa

    from dl_pipeline.line_splits import read_back

    raw = rows.column("raw").to_pylist()
    at = np.column_stack([rows.column(c).fill_null(-1).to_numpy() for c in ("raw_start", "raw_end")])
    files = rows.column("source_file").to_pylist()
    todo: dict[str, list[int]] = collections.defaultdict(list)
    for i, (text, start) in enumerate(zip(raw, at[:, 0], strict=True)):
        if text is None and start >= 0:
            todo[files[i]].append(i)
    for url, where in todo.items():
        for i, line in zip(where, read_back(url, at[where]), strict=True):
            raw[i] = line
    return pa.array(raw, pa.large_string())
