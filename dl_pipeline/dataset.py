"""The prepared dataset on disk: Petastorm Unischema, writing with materialize_dataset, manifest.

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


@contextlib.contextmanager
def parquet_write_settings(spark, row_group_mb: int) -> Iterator[None]:
    """Hadoop settings for writing a Petastorm dataset (what ``materialize_dataset`` sets).

    No summary files; ``parquet.block.size`` above a whole group so each file is one row group.
    """
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    wanted = {
        "parquet.summary.metadata.level": "NONE",
        "parquet.block.size.row.check.min": "3",
        "parquet.row-group.size.row.check.min": "3",
        "parquet.block.size": str(row_group_mb << 20),
        # Feature blobs are all distinct: trying a dictionary first only costs time (~10%).
        "parquet.enable.dictionary": "false",
    }
    before = {k: conf.get(k) for k in wanted}
    for k, v in wanted.items():
        conf.set(k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            conf.unset(k) if v is None else conf.set(k, v)


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
