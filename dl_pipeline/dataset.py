"""The prepared dataset on disk: Petastorm Unischema, writing with materialize_dataset, manifest.

Layout of ``prepare.output_path``::

    manifest.json          counts, schema, label map, featurizer spec, row groups, timings
    train/ val/ test/      Petastorm datasets, one Parquet file = one row group, near-equal sizes
    rejects/               Parquet: source_file, row_number, raw (<= 4 KB), reason
"""

from __future__ import annotations

import json
from typing import Any

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
