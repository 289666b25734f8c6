"""A rank's shard as batches of tensors, with no Python work per row (executor-side code).

Petastorm's columnar reader (``make_batch_reader``) hands back one whole row group at a time
as numpy arrays (the shards are plain Parquet with fixed-length list columns, see
``dataset.py``): ``tokens`` [rows, T] int32, ``chars`` [rows, L] uint8, ``image`` [rows, H*W*C]
uint8. From there every step works on whole arrays:

  * a shard that fits ``train.cache_mb`` is read once and held (``ResidentShard``): each epoch
    is one seeded permutation of all its rows; a larger shard streams, with a seeded shuffle
    across a pool of at least ``shuffle_buffer`` rows (several row groups, whose order
    Petastorm also shuffles per pass); then fixed-size batches by fancy indexing;
  * the model's inputs built per batch (fastText: the real ids and offsets, no padding);
  * all of it in a background thread, a few batches ahead, so a step never waits, and on CUDA
    into pinned memory, so the copy to the device is asynchronous.

Training streams are endless (one Petastorm pass after another): the loop takes exactly
``steps_per_epoch`` batches, so a rank with a smaller shard wraps around and every rank runs
the same number of steps (an allreduce never waits for a rank that ran out). Each epoch opens
its own reader, seeded by (seed, shard, epoch): with one reader thread the batches of an epoch
are the same on every run, which is what makes a resumed run equal an uninterrupted one. The
epochs run back to back in one background thread, so the next epoch's reader is open and its
pool full before the current epoch's evaluation ends.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import warnings
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator

import numpy as np

PREFETCH_BATCHES = 4


def resolve_reader(choice: str) -> str:
    """``auto`` -> Petastorm where it is installed (the default stack), else pyarrow alone
    (stacks Petastorm cannot run on: pyarrow >= 15, numpy 2); other choices as they are."""
    import importlib.util

    if choice != "auto":
        return choice
    return "petastorm" if importlib.util.find_spec("petastorm") is not None else "arrow"


@contextlib.contextmanager
def row_groups(url: str, columns: Iterable[str], shapes: dict[str, list[int]], shard: int, shards: int, *,
               epochs: int | None, seed: int, shuffle: bool, workers: int,
               reader: str = "auto") -> Iterator[Iterator[dict[str, np.ndarray]]]:
    """The row groups ``shard`` of ``shards`` owns, as an iterator of {column: array [rows,
    *shape]}, one per row group; the reader is stopped on exit. ``reader``: ``petastorm``
    (``make_batch_reader``), ``arrow`` (pyarrow alone, see _arrow_row_groups) or ``auto``
    (Petastorm where installed). Both deal out the same row groups in the same order and hand
    back the same arrays, so training is the same whichever reads (with one reader thread)."""
    if resolve_reader(reader) == "arrow":
        yield _arrow_row_groups(url, list(columns), shapes, shard, shards, epochs=epochs, seed=seed, shuffle=shuffle)
        return
    from petastorm import make_batch_reader

    columns = list(columns)
    with warnings.catch_warnings():
        # petastorm 0.12 opens the dataset with pyarrow's legacy ParquetDataset (deprecated in 14)
        warnings.simplefilter("ignore", FutureWarning)
        petastorm_reader = make_batch_reader(
            url, schema_fields=columns, cur_shard=shard, shard_count=shards, num_epochs=epochs,
            shuffle_row_groups=shuffle, seed=seed, reader_pool_type="thread", workers_count=workers,
        )
    if hasattr(petastorm_reader, "_results_queue_reader"):  # petastorm 0.12.1, pinned in pyproject.toml
        petastorm_reader._results_queue_reader = _WholeColumns()
    with petastorm_reader:
        yield ({c: _shaped(getattr(batch, c), shapes.get(c, [])) for c in columns} for batch in petastorm_reader)


def shard_row_groups(url: str, shard: int, shards: int, seed: int) -> list[tuple[str, int]]:
    """(file, row group) pairs ``shard`` of ``shards`` owns, in the order Petastorm 0.12.1's
    ``make_batch_reader(seed=seed, cur_shard=shard, shard_count=shards)`` reads them: the
    split's row groups numbered in file order, the numbers shuffled by ``random.Random(seed)``,
    and those with ``number % shards == shard`` kept in that order."""
    import random

    import pyarrow.parquet as pq

    from dl_pipeline import fsutil

    fs, root = fsutil.fs_and_path(url)
    files = sorted(p for p in fs.ls(root, detail=False)
                   if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_")))
    pieces = []
    for path in files:
        with fs.open(path) as fh:
            pieces += [(path, i) for i in range(pq.ParquetFile(fh).num_row_groups)]
    if len(pieces) < shards:
        raise ValueError(f"{url}: {len(pieces)} row groups for {shards} shards")
    numbers = list(range(len(pieces)))
    random.Random(seed).shuffle(numbers)
    return [pieces[i] for i in numbers if i % shards == shard]


def _arrow_row_groups(url: str, columns: list[str], shapes: dict[str, list[int]], shard: int, shards: int, *,
                      epochs: int | None, seed: int, shuffle: bool) -> Iterator[dict[str, np.ndarray]]:
    """The shard's row groups read with pyarrow alone (no Petastorm), in Petastorm's order:
    ``epochs`` passes (None: endless), each pass's order shuffled in place by one
    ``np.random.RandomState(seed)`` when ``shuffle`` (its ventilator's rule)."""
    import pyarrow.parquet as pq

    from dl_pipeline import fsutil

    fs, _ = fsutil.fs_and_path(url)
    pieces = shard_row_groups(url, shard, shards, seed)
    state = np.random.RandomState(seed)
    for _ in itertools.count() if epochs is None else range(epochs):
        if shuffle:
            state.shuffle(pieces)
        for path, group in pieces:
            with fs.open(path) as fh:
                table = pq.ParquetFile(fh).read_row_group(group, columns=columns)
            yield {c: _shaped(_column_values(table.column(c)), shapes.get(c, [])) for c in columns}


class _WholeColumns:
    """Petastorm's batch results (one Arrow table per row group) -> numpy columns, each list
    column as one zero-copy [rows, width] view of its values buffer.

    Why: petastorm 0.12.1's own ``ArrowReaderWorkerResultsQueueReader.read_next`` turns a list
    column into an object array of one array per row and ``np.vstack``s it: ~3 us of Python per
    row, holding the GIL in the thread that feeds the model (measured: 30 ms of a 62 ms pass
    over the AG sample's 9.9k rows). Sharding, row-group shuffling, seeds and the worker pool
    stay Petastorm's; only the last conversion is replaced, on the reader this module opens.
    """

    batched_output = True

    def read_next(self, workers_pool, schema, ngram):
        from petastorm.workers_pool import EmptyResultError

        try:
            table = workers_pool.get_results()
        except EmptyResultError:
            raise StopIteration from None
        return schema.make_namedtuple(**{name: _column_values(table.column(name)) for name in table.column_names})


def _column_values(column) -> np.ndarray:
    """An Arrow column without nulls -> numpy; a list column -> [rows, width]."""
    import pyarrow as pa

    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array.to_numpy(zero_copy_only=False).astype(np.str_)  # as Petastorm's own reader does
    if not pa.types.is_list(array.type):
        return array.to_numpy(zero_copy_only=False)
    offsets = array.offsets.to_numpy()
    widths = np.diff(offsets)
    if len(widths) and (widths != widths[0]).any():  # not a shard of ours
        raise ValueError("a feature column holds rows of different lengths; re-run `dl-pipeline prepare`")
    values = array.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return values.reshape(len(array), -1)


def _shaped(values: np.ndarray, shape: list[int]) -> np.ndarray:
    """A column as read -> [rows, *shape] (lists come back [rows, width])."""
    if values.dtype == object:  # a list column whose rows differ in length: not a shard of ours
        raise ValueError("a feature column holds rows of different lengths; re-run `dl-pipeline prepare`")
    return values.reshape(len(values), *shape) if shape else values


def shuffled_batches(groups: Iterable[dict[str, np.ndarray]], batch_size: int, buffer_rows: int,
                     rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """Row groups -> batches of exactly ``batch_size`` rows, shuffled across a pool of at least
    ``buffer_rows`` rows: the pool is permuted as a whole and cut into batches; the rows left
    over (< batch_size) start the next pool. A finite input's last rows (< one batch) are dropped."""
    pool: list[dict[str, np.ndarray]] = []
    rows = 0
    for group in groups:
        pool.append(group)
        rows += len(group["label"])
        if rows < max(buffer_rows, batch_size):
            continue
        merged = {k: np.concatenate([p[k] for p in pool]) for k in pool[0]} if len(pool) > 1 else pool[0]
        order = rng.permutation(rows)
        full = rows - rows % batch_size
        for start in range(0, full, batch_size):
            idx = order[start : start + batch_size]
            yield {k: v[idx] for k, v in merged.items()}
        rest = order[full:]
        pool, rows = [{k: v[rest] for k, v in merged.items()}], len(rest)


def ordered_batches(groups: Iterable[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Row groups -> batches of at most ``batch_size`` rows, in order, every row once (evaluation)."""
    for group in groups:
        n = len(group["label"])
        for start in range(0, n, batch_size):
            yield {k: v[start : start + batch_size] for k, v in group.items()}


def to_tensors(batch: dict[str, np.ndarray], pin: bool = False, distinct: bool = False) -> dict[str, Any]:
    """numpy columns -> the model's input tensors: ``label`` int64 [B]; ``tokens`` with
    ``length`` -> ``token_ids`` + ``token_offsets`` (models.bag_inputs); ``tokens`` with
    ``words`` -> ``seq`` + ``seq_length`` (models.sequence_inputs); or those as given
    (a ResidentShard's batches); ``distinct`` adds the batch's distinct ids and their bags
    (models.bag_groups), which training's backward wants, here in the data thread and not in
    the step;
    others as stored."""
    import torch

    from dl_pipeline.models import bag_groups, bag_inputs, sequence_inputs

    batch = dict(batch)
    if "tokens" in batch and "length" in batch:
        batch.update(bag_inputs(batch.pop("tokens"), batch.pop("length")))
    elif "tokens" in batch and "words" in batch:  # a recurrent model: the unigrams in order
        batch.update(sequence_inputs(batch.pop("tokens"), batch.pop("words")))
    if distinct and "token_ids" in batch:
        batch.update(bag_groups(batch["token_ids"], batch["token_offsets"]))
    out = {"label": torch.from_numpy(batch.pop("label").astype(np.int64))}
    with warnings.catch_warnings():
        # Petastorm's arrays are read-only; the tensors made from them are only ever read
        warnings.simplefilter("ignore", UserWarning)
        for name, arr in batch.items():
            out[name] = torch.from_numpy(np.ascontiguousarray(arr))
    if pin:
        out = {k: v.pin_memory() for k, v in out.items()}
    return out


class ResidentShard:
    """One reader's shard of a split, read once through Petastorm and then held in memory as
    whole arrays, in the order the reader hands out its row groups (seeded: the same on every run).

    Why: on a small machine the data thread's CPU comes out of the cores the step uses. Per row
    (AG News sample, 2 cores): a Petastorm pass costs ~5.7 us, the padded ``tokens`` gather and
    ``bag_inputs`` ~3.7 us, against ~15 us of model step. Held here, a batch is one gather of
    its rows' real ids (~0.25 us/row, no padding copied). A shard is held
    when the driver's estimate of its decoded size fits ``train.cache_mb`` (spec.resident);
    larger shards stream from Parquet pass after pass (``epoch_batches``).

    Token features are kept ragged: ``ids`` int32 [sum(length)] (each row's real ids end to
    end), ``starts`` int64 [rows], ``length`` int32 [rows]; any other feature as [rows, *shape].
    """

    def __init__(self, columns: dict[str, np.ndarray]):
        columns = dict(columns)
        self.rows = len(columns["label"])
        self.ids = self.starts = self.length = None
        if "tokens" in columns and "length" in columns:
            tokens, length = columns.pop("tokens"), columns.pop("length").astype(np.int32)
            self.ids = tokens[np.arange(tokens.shape[1]) < length[:, None]]  # rows keep real ids first
            self.starts = np.zeros(self.rows, dtype=np.int64)
            np.cumsum(length[:-1], out=self.starts[1:])
            self.length = length
        self.columns = columns

    @classmethod
    def read(cls, url: str, columns: Iterable[str], shapes: dict[str, list[int]], shard: int, shards: int,
             reader: str = "auto") -> ResidentShard:
        """One ordered pass (one reader thread: row groups arrive in a seeded order, so the held
        rows, and every batch drawn from them, are the same on every run)."""
        with row_groups(url, columns, shapes, shard, shards, epochs=1, seed=0, shuffle=False, workers=1,
                        reader=reader) as groups:
            parts = list(groups)
        if not parts:
            raise ValueError(f"{url}: shard {shard} of {shards} has no rows")
        return cls({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``idx`` [B] as model inputs: ``label`` [B] and the feature; for tokens, the
        rows' real ids end to end ``token_ids`` int32 [N] and ``token_offsets`` int32 [B]."""
        out = {k: v[idx] for k, v in self.columns.items()}
        if self.ids is not None:
            length = self.length[idx]
            offsets = np.zeros(len(idx), dtype=np.int64)
            np.cumsum(length[:-1], out=offsets[1:])
            n = int(offsets[-1] + length[-1]) if len(idx) else 0
            out["token_ids"] = self.ids[np.arange(n) + np.repeat(self.starts[idx] - offsets, length)]
            out["token_offsets"] = offsets.astype(np.int32)
        return out

    def epoch_batches(self, rng: np.random.Generator, batch_size: int, steps: int, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches ``skip`` .. ``steps - 1`` of an epoch: the rows in one seeded permutation after
        another (a small shard wraps around; the rows left over from one permutation start the
        next batch), ``batch_size`` rows each."""
        pending = np.empty(0, dtype=np.int64)
        for step in range(steps):
            while len(pending) < batch_size:
                pending = np.concatenate([pending, rng.permutation(self.rows)])
            idx, pending = pending[:batch_size], pending[batch_size:]
            if step >= skip:
                yield self.take(idx)

    def ordered_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Every row once, in order, ``batch_size`` rows at most per batch (evaluation)."""
        for start in range(0, self.rows, batch_size):
            yield self.take(np.arange(start, min(start + batch_size, self.rows)))


class Prefetcher:
    """Runs a generator in a background thread, up to ``depth`` items ahead.

    numpy's and torch's kernels release the GIL, so preparing the next batches overlaps the
    model step. An exception in the thread is raised by ``next``; ``close`` stops the thread
    and closes the generator there (which stops the readers it holds open).
    """

    _END = object()

    def __init__(self, items: Iterator[Any], depth: int = PREFETCH_BATCHES):
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dl-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(_Failure(exc))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            self._queue.put(self._END)  # later calls stop too
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def preload(url: str, columns: Iterable[str], shapes: dict[str, list[int]], shard: int, shards: int,
            reader: str = "auto") -> Future:
    """Start reading a ResidentShard in a background thread; the Future's result is the shard.
    A rank starts it before its set-up (Horovod, model, resume), so the first step finds its
    data read: the read (~0.4 s for 10k AG News rows, mostly Petastorm's start-up) would
    otherwise be a wait inside the first epoch."""
    future: Future = Future()

    def read() -> None:
        try:
            future.set_result(ResidentShard.read(url, columns, shapes, shard, shards, reader))
        except BaseException as exc:  # noqa: BLE001 - raised by the Future's result()
            future.set_exception(exc)

    threading.Thread(target=read, name="dl-preload", daemon=True).start()
    return future


def stream_seed(seed: int, shard: int, epoch: int) -> int:
    """Petastorm's and the shuffle's seed for one shard's epoch (an int below 2**31)."""
    return (seed * 1_000_003 + shard * 7_919 + epoch * 104_729) % (2**31 - 1)


def epoch_batches(url: str, columns: Iterable[str], shapes: dict[str, list[int]], shard: int, shards: int, *,
                  epoch: int, seed: int, batch_size: int, buffer_rows: int, workers: int, steps: int,
                  skip: int = 0, reader: str = "auto") -> Iterator[dict[str, np.ndarray]]:
    """Batches ``skip`` .. ``steps - 1`` of one epoch of ``shard``: an endless, seeded stream
    (a small shard wraps around) cut to the epoch's fixed step count; the reader stops after."""
    s = stream_seed(seed, shard, epoch)
    passes = _passes(url, columns, shapes, shard, shards, seed=s, workers=workers, reader=reader)
    try:
        batches = shuffled_batches(passes, batch_size, buffer_rows, np.random.default_rng(s))
        for _ in range(skip):
            next(batches)
        for _ in range(steps - skip):
            yield next(batches)
    finally:
        passes.close()  # stops the open reader


def _passes(url: str, columns: Iterable[str], shapes: dict[str, list[int]], shard: int, shards: int, *,
            seed: int, workers: int, reader: str = "auto") -> Iterator[dict[str, np.ndarray]]:
    """Endless row groups of ``shard``: pass after pass, each pass its own reader
    (``num_epochs=1``) with its own seed. Not Petastorm's ``num_epochs=None``: its ventilator
    reshuffles the row-group order again whenever it waits for queue room at the start of a
    pass (uber/petastorm#798, open in 0.12.1), so from the second pass on the order depended on
    timing, and a resumed run would not have equalled an uninterrupted one."""
    for p in itertools.count():
        with row_groups(url, columns, shapes, shard, shards, epochs=1, seed=(seed + 7_919 * p) % (2**31 - 1),
                        shuffle=True, workers=workers, reader=reader) as groups:
            empty = True
            for group in groups:
                empty = False
                yield group
        if empty:  # the driver's layout check makes this unreachable; never spin on nothing
            raise ValueError(f"{url}: shard {shard} of {shards} has no rows")


@contextlib.contextmanager
def train_batches(url: str, columns: Iterable[str], shapes: dict[str, list[int]], shard: int, shards: int, *,
                  first_epoch: int, epochs: int, steps_per_epoch: Callable[[int], int], seed: int, batch_size: int,
                  buffer_rows: int, workers: int, pin: bool = False, skip: int = 0,
                  resident: bool | Future = False, background: bool = True,
                  reader: str = "auto") -> Iterator[Iterator[dict[str, Any]]]:
    """The training batches (tensors) of epochs ``first_epoch`` .. ``epochs - 1`` back to back,
    ``steps_per_epoch(epoch)`` of each, made in one background thread: the next epoch's reader
    opens and fills its shuffle pool while this epoch ends and the model is evaluated, so no
    epoch starts with a wait. ``skip`` batches of the first epoch were trained before a resume.
    ``resident``: the shard is read once and held (ResidentShard; a Future of it: already being
    read, see ``preload``), each epoch one seeded permutation of all its rows; otherwise
    streamed from Parquet pass after pass. Either way
    each epoch's batches depend only on (seed, shard, epoch), never on where a run started.
    ``background=False`` makes each batch when it is asked for, in the caller's thread."""

    def batches():
        if isinstance(resident, Future):
            held = resident.result()
        else:
            held = ResidentShard.read(url, columns, shapes, shard, shards, reader) if resident else None
        for epoch in range(first_epoch, epochs):
            steps, first = steps_per_epoch(epoch), skip if epoch == first_epoch else 0
            if held is not None:
                rng = np.random.default_rng(stream_seed(seed, shard, epoch))
                epoch_iter = held.epoch_batches(rng, batch_size, steps, skip=first)
            else:
                epoch_iter = epoch_batches(url, columns, shapes, shard, shards, epoch=epoch, seed=seed, batch_size=batch_size,
                                           buffer_rows=buffer_rows, workers=workers, steps=steps, skip=first, reader=reader)
            for batch in epoch_iter:
                yield to_tensors(batch, pin, distinct=True)

    feed = Prefetcher(batches()) if background else batches()
    try:
        yield feed
    finally:
        feed.close()


@contextlib.contextmanager
def eval_stream(url: str, columns: Iterable[str], shapes: dict[str, list[int]], shard: int, shards: int, *,
                batch_size: int, workers: int, pin: bool = False,
                held: ResidentShard | None = None, reader: str = "auto") -> Iterator[Iterator[dict[str, Any]]]:
    """One pass over ``shard`` of ``shards`` in order, as batches of tensors; from ``held``
    (the same shard, already in memory) when given."""

    def batches():
        if held is not None:
            for batch in held.ordered_batches(batch_size):
                yield to_tensors(batch, pin)
            return
        with row_groups(url, columns, shapes, shard, shards, epochs=1, seed=0, shuffle=False, workers=workers,
                        reader=reader) as groups:
            for batch in ordered_batches(groups, batch_size):
                yield to_tensors(batch, pin)

    feed = Prefetcher(batches())
    try:
        yield feed
    finally:
        feed.close()
