"""The prepared dataset on disk: typed Parquet columns, one row group per file, the manifest.

Layout of ``prepare.output_path``::

    manifest.json          counts, schema, label map, featurizer spec, row groups, timings, and
                           ``root``: the run directory below that holds this dataset
    v/<run>/train/ val/ test/
                           plain Parquet, one file = one row group, near-equal sizes (rows are
                           dealt to groups by a seeded hash of their content)
    v/<run>/rejects/       Parquet: source_file, row_number, raw (<= 4 KB), reason

Each prepare run writes a new ``v/<run>/`` and publishes it by replacing ``manifest.json`` (one
atomic rename): a reader resolves the manifest once (``data_root``) and sees the old dataset or
the new one, never a mix. The previous run's directory is kept (a training run that resolved it
keeps reading it); older ones are removed by the next publish.

Columns (see ``arrow_schema``): ``row_id`` string, ``label`` int32, and per feature a plain
Parquet list whose rows all have the same length, so Petastorm's ``make_batch_reader``, Spark,
pandas, pyarrow and DuckDB all read them without our code: ``tokens`` list<int32> [max_tokens]
(0 pads after ``length`` real ids), ``length`` int32, ``chars`` list<uint8> [char_length],
``image`` list<uint8> [H * W * C] (row-major H, W, C; the shape is in the manifest). Nothing
pickled is written: there is no Petastorm Unischema, the schema lives in ``manifest.json``.
"""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

from dl_pipeline import fsutil
from dl_pipeline.errors import PipelineError, UserError

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


def feature_shapes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Featurizer spec -> {column: {"dtype", "shape"}}, the manifest's ``schema``: the shape of
    one row as a reader hands it to a model (stored flat as one list per row)."""
    out: dict[str, dict[str, Any]] = {"row_id": {"dtype": "str", "shape": []}, "label": {"dtype": "int32", "shape": []}}
    if spec["kind"] == "text":
        if spec["chars"]["enabled"]:
            out["chars"] = {"dtype": "uint8", "shape": [spec["chars"]["length"]]}
        if spec["tokens"]["enabled"]:
            out["tokens"] = {"dtype": "int32", "shape": [spec["tokens"]["max_tokens"]]}
            out["length"] = {"dtype": "int32", "shape": []}
            out["words"] = {"dtype": "int32", "shape": []}
    else:
        im = spec["image"]
        out["image"] = {"dtype": "uint8", "shape": [im["height"], im["width"], im["channels"]]}
    return out


def arrow_schema(spec: dict[str, Any]):
    """The Arrow schema of every shard file. Column order is fixed (byte-identical output)."""
    import pyarrow as pa

    types = {"str": pa.string(), "int32": pa.int32(), "uint8": pa.uint8()}
    fields = []
    for name, col in feature_shapes(spec).items():
        t = types[col["dtype"]]
        fields.append(pa.field(name, pa.list_(t) if col["shape"] else t))
    return pa.schema(fields)


ITEMSIZE = {"int32": 4, "uint8": 1}  # bytes per value of the numeric dtypes in feature_shapes


def column_bytes(col: dict[str, Any]) -> int:
    """The bytes of one row's value of a numeric column ({"dtype", "shape"}), as numpy holds it."""
    n = ITEMSIZE[col["dtype"]]
    for d in col["shape"]:
        n *= d
    return n


def bytes_per_row(spec: dict[str, Any]) -> int:
    """Rough stored size of one row, to size row groups before writing."""
    return 32 + sum(column_bytes(col) + 4 for col in feature_shapes(spec).values() if col["shape"])


def read_manifest(path: str) -> dict[str, Any]:
    url = fsutil.join(fsutil.to_url(path), MANIFEST)
    if not fsutil.exists(url):
        raise UserError(
            f"{path}: no {MANIFEST} here; point train.data_path at a directory written by `dl-pipeline prepare`"
        )
    manifest = json.loads(fsutil.read_text(url))
    if manifest.get("format") not in READABLE:
        raise UserError(
            f"{path}/{MANIFEST}: format {manifest.get('format')!r}, this version reads {FORMAT!r} "
            "(typed Parquet columns); re-run `dl-pipeline prepare` to rewrite the dataset"
        )
    return manifest


# /2: typed list columns (no Petastorm Unischema, no NdarrayCodec blobs). /3: the same files in
# the run directory the manifest's ``root`` names (a /2 reader would look for <path>/train).
FORMAT = "dl_pipeline.prepared/3"
READABLE = ("dl_pipeline.prepared/2", FORMAT)


def data_root(path: str, manifest: dict[str, Any]) -> str:
    """The URL of the run directory that ``manifest`` (read from ``path``) publishes. Datasets
    written before runs had their own directory have no ``root``: their splits sit in ``path``."""
    url = fsutil.to_url(path).rstrip("/")
    return fsutil.join(url, manifest["root"]) if manifest.get("root") else url


def split_url(path: str, split: str) -> str:
    """The URL of one split (or ``rejects``) of the dataset published at ``path`` now."""
    return fsutil.join(data_root(path, read_manifest(path)), split)


def temp_name(path: str) -> str:
    """An attempt-unique temporary name next to ``path``, hidden ('.' prefix) so that Spark,
    pyarrow and Petastorm skip it if a failed task attempt leaves it behind."""
    import uuid

    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.{uuid.uuid4().hex}.tmp"


@contextlib.contextmanager
def parquet_file(url: str, schema, **options) -> Iterator[Any]:
    """A pyarrow ParquetWriter for ``url`` (any fsspec filesystem); readers never see half a file.

    Runs on executors. Written under an attempt-unique hidden name and renamed on success, so
    a retried or speculative task writing the same file (same rows, same bytes) cannot
    interleave, and a failed attempt leaves nothing a reader would load.
    """
    import pyarrow.parquet as pq

    fs, path = fsutil.fs_and_path(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = temp_name(path)
    with fs.open(tmp, "wb") as fh, pq.ParquetWriter(fh, schema, **options) as writer:
        yield writer
    fs.mv(tmp, path)


def use_mimalloc() -> None:
    """Make Arrow's mimalloc pool this process's default, where pyarrow was built with it.

    Each shard file is one row group built and written at once; under the default jemalloc pool
    that cost ~19 CPU-us/row against ~15.5 under mimalloc (64k AG News rows as 8 files; one file
    of 8 row groups: 15.5 and 14). Called by prepare's tasks, and by the single-process peer in
    bench/prepare_bench.py, so the two are compared with the same allocator."""
    import pyarrow as pa

    with contextlib.suppress(NotImplementedError):
        if pa.default_memory_pool().backend_name != "mimalloc":
            pa.set_memory_pool(pa.mimalloc_memory_pool())


def write_row_group(url: str, table) -> None:
    """Write ``table`` as one Parquet file holding one row group (see parquet_file).

    Dictionary encoding is off (feature rows are all distinct: it only costs time) and
    statistics are kept for the scalar columns only (min/max of feature lists are useless).
    """
    import pyarrow as pa

    stats = [f.name for f in table.schema if not (pa.types.is_binary(f.type) or pa.types.is_list(f.type))]
    with parquet_file(url, table.schema, compression="snappy", use_dictionary=False, write_statistics=stats) as writer:
        writer.write_table(table, row_group_size=max(1, table.num_rows))


def finalize_split(url: str, schema) -> list[dict[str, Any]]:
    """Check a split directory's files against ``schema``; returns [{file, rows, row_groups}].

    Reads only the footers (a few KB each), in parallel: a file with another schema (an old
    dataset's leftovers, a foreign writer) fails here, not in training.
    """
    import pyarrow.parquet as pq

    fs, root = fsutil.fs_and_path(url)
    paths = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_")))

    def footer(path: str) -> dict[str, Any]:
        with fs.open(path) as fh:
            meta = pq.read_metadata(fh)
        if not meta.schema.to_arrow_schema().equals(schema):
            raise PipelineError(f"{path}: schema {meta.schema.to_arrow_schema()} is not the dataset's {schema}")
        return {"file": path.rsplit("/", 1)[-1], "rows": meta.num_rows, "row_groups": meta.num_row_groups}

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(footer, paths))
