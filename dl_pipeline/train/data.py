"""Reading a rank's Petastorm shard as batches of tensors (executor-side code)."""

from __future__ import annotations

from typing import Iterator

import numpy as np


def _reader(url: str, fields: list[str], shard: int, shards: int, epochs: int | None, seed: int, workers: int, shuffle: bool):
    from petastorm import make_reader

    return make_reader(
        url,
        schema_fields=fields,
        cur_shard=shard,
        shard_count=shards,
        num_epochs=epochs,
        shuffle_row_groups=shuffle,
        seed=seed,
        reader_pool_type="thread",
        workers_count=workers,
    )


def _batches_from_rows(rows, fields: list[str], batch_size: int, buffer: int, rng: np.random.Generator | None) -> Iterator[dict]:
    """Rows -> dict batches of numpy arrays; a shuffling buffer mixes rows across row groups."""
    pool: list = []
    for row in rows:
        pool.append(row)
        if len(pool) >= max(buffer, batch_size):
            if rng is not None:
                picks = rng.choice(len(pool), size=batch_size, replace=False)
                chosen = [pool[i] for i in picks]
                for i in sorted(picks, reverse=True):
                    pool[i] = pool[-1]
                    pool.pop()
            else:
                chosen, pool = pool[:batch_size], pool[batch_size:]
            yield {f: np.stack([getattr(r, f) for r in chosen]) for f in fields}
    if rng is not None:
        rng.shuffle(pool)
    for i in range(0, len(pool), batch_size):
        chunk = pool[i : i + batch_size]
        yield {f: np.stack([getattr(r, f) for r in chunk]) for f in fields}


def _to_torch(batches):
    import torch

    for b in batches:
        yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}


def train_batches(url: str, feature: str, shard: int, shards: int, batch_size: int, seed: int, workers: int, buffer: int):
    """Endless shuffled batches from one shard: the caller takes exactly N per epoch, so a
    rank with a smaller shard simply wraps around and every rank runs the same step count."""
    fields = ["label", feature]
    reader = _reader(url, fields, shard, shards, None, seed, workers, True)
    rng = np.random.default_rng(seed)
    return reader, _to_torch(_batches_from_rows(reader, fields, batch_size, buffer, rng))


def eval_batches(url: str, feature: str, shard: int, shards: int, batch_size: int, workers: int):
    """One pass over a shard, in order: a context manager yielding batches."""
    fields = ["label", feature]
    reader = _reader(url, fields, shard, shards, 1, 0, workers, False)
    return reader, _to_torch(_batches_from_rows(reader, fields, batch_size, 0, None))
