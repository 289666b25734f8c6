"""The prepared dataset on disk: Petastorm Unischema, row-group files, Petastorm metadata, manifest.

Layout of ``prepare.output_path``::

    manifest.json          counts, schema, label map, featurizer spec, row groups, timings
    train/ val/ test/      Petastorm datasets, one Parquet file = one row group, near-equal sizes
                           (rows are dealt to groups by a seeded hash of their content)
    rejects/               Parquet: source_file, row_number, raw (<= 4 KB), reason
"""

from __future__ import annotations

import contextlib
import json
import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np

from dl_pipeline import fsutil
from dl_pipeline.errors import UserError

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


def make_schema(spec: dict[str, Any]):
    """Featurizer spec -> Petastorm Unischema. Column order is fixed (byte-identical output)."""
    from petastorm.codecs import NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField
    from pyspark.sql.types import IntegerType, StringType

    fields = [
        UnischemaField("row_id", np.str_, (), ScalarCodec(StringType()), False),
        UnischemaField("label", np.int32, (), ScalarCodec(IntegerType()), False),
    ]
    if spec["kind"] == "text":
        if spec["chars"]["enabled"]:
            fields.append(UnischemaField("chars", np.uint8, (spec["chars"]["length"],), NdarrayCodec(), False))
        if spec["tokens"]["enabled"]:
            fields.append(UnischemaField("tokens", np.int32, (spec["tokens"]["max_tokens"],), NdarrayCodec(), False))
            fields.append(UnischemaField("length", np.int32, (), ScalarCodec(IntegerType()), False))
    else:
        im = spec["image"]
        shape = (im["height"], im["width"], im["channels"])
        fields.append(UnischemaField("image", np.uint8, shape, NdarrayCodec(), False))
    return Unischema("DlPipelineRow", fields)


def bytes_per_row(spec: dict[str, Any]) -> int:
    """Rough encoded size of one row, to size row groups before writing."""
    if spec["kind"] == "text":
        n = 32
        if spec["chars"]["enabled"]:
            n += spec["chars"]["length"] + 128
        if spec["tokens"]["enabled"]:
            n += 4 * spec["tokens"]["max_tokens"] + 128
        return n
    im = spec["image"]
    return 32 + im["height"] * im["width"] * im["channels"] + 128


def read_manifest(path: str) -> dict[str, Any]:
    url = fsutil.join(fsutil.to_url(path), MANIFEST)
    if not fsutil.exists(url):
        raise UserError(
            f"{path}: no {MANIFEST} here; point train.data_path at a directory written by `dl-pipeline prepare`"
        )
    return json.loads(fsutil.read_text(url))


def split_url(path: str, split: str) -> str:
    return fsutil.join(fsutil.to_url(path), split)


def arrow_schema(schema):
    """Unischema -> the Arrow schema of its Parquet files (NdarrayCodec fields are binary)."""
    import pyarrow as pa
    from pyspark.sql.types import BinaryType, IntegerType, StringType

    types = {BinaryType(): pa.binary(), IntegerType(): pa.int32(), StringType(): pa.string()}
    return pa.schema([pa.field(f.name, types[f.dataType]) for f in schema.as_spark_schema().fields])


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


def write_row_group(url: str, table) -> None:
    """Write ``table`` as one Parquet file holding one row group (see parquet_file).

    Dictionary encoding is off (feature blobs are all distinct: it only costs time) and
    statistics are kept for the small columns only (min/max of 1 KB blobs are useless).
    """
    import pyarrow as pa

    stats = [f.name for f in table.schema if not pa.types.is_binary(f.type)]
    with parquet_file(url, table.schema, compression="snappy", use_dictionary=False, write_statistics=stats) as writer:
        writer.write_table(table, row_group_size=max(1, table.num_rows))


def finalize_petastorm(url: str, schema) -> list[dict[str, Any]]:
    """Turn a directory of Parquet files into a Petastorm dataset; returns [{file, rows, row_groups}].

    Writes ``_common_metadata`` with the pickled Unischema and the row groups per file, as
    ``materialize_dataset`` does, but reads the footers here instead of in a Spark job (one
    job per split cost seconds; the footers are a few KB each). Then loads the row groups back
    the way ``make_reader`` will, so a dataset Petastorm cannot open fails here, not in training.
    """
    import pyarrow.parquet as pq
    from petastorm.etl.dataset_metadata import ROW_GROUPS_PER_FILE_KEY, UNISCHEMA_KEY, load_row_groups
    from petastorm.fs_utils import FilesystemResolver
    from petastorm.utils import add_to_dataset_metadata

    resolver = FilesystemResolver(url)
    fs, root = resolver.filesystem(), resolver.get_dataset_path()
    ds = pq.ParquetDataset(root, filesystem=fs, validate_schema=False)
    paths = sorted(piece.path for piece in ds.pieces)

    def footer(path: str) -> dict[str, Any]:
        with fs.open(path) as fh:
            meta = pq.read_metadata(fh)
        return {"file": path.rsplit("/", 1)[-1], "rows": meta.num_rows, "row_groups": meta.num_row_groups}

    with ThreadPoolExecutor(max_workers=8) as pool:
        files = list(pool.map(footer, paths))
    add_to_dataset_metadata(ds, UNISCHEMA_KEY, pickle.dumps(schema))
    add_to_dataset_metadata(ds, ROW_GROUPS_PER_FILE_KEY, json.dumps({f["file"]: f["row_groups"] for f in files}))
    load_row_groups(pq.ParquetDataset(root, filesystem=fs, validate_schema=False))
    return files
