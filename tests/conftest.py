"""Shared fixtures: ONE local Spark session, the bundled AG News sample prepared once, and a
small model trained on it once. Everything is real: Spark, Petastorm files, Horovod ranks."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample")
AG_TRAIN = os.path.join(SAMPLE, "ag_news", "train.csv.gz")
AG_TEST = os.path.join(SAMPLE, "ag_news", "test.csv.gz")
DEMO_CONF = os.path.join(ROOT, "conf", "demo.yaml")


HAS_HOROVOD = importlib.util.find_spec("horovod") is not None
HAS_PETASTORM = importlib.util.find_spec("petastorm") is not None
requires_horovod = pytest.mark.skipif(not HAS_HOROVOD, reason="no Horovod on this stack (spark4 trains with torch_distributor)")
requires_petastorm = pytest.mark.skipif(not HAS_PETASTORM, reason="no Petastorm on this stack (spark4 reads with pyarrow)")
# The multi-rank launcher on Spark: Horovod where it is installed, else TorchDistributor.
SPARK_LAUNCHER = "spark" if HAS_HOROVOD else "torch_distributor"


@pytest.fixture(scope="session")
def spark():
    from dl_pipeline.config import SparkConfig
    from dl_pipeline.spark import get_spark

    session = get_spark(
        SparkConfig(
            master="local[2]",
            app_name="dl_pipeline-tests",
            conf={"spark.sql.shuffle.partitions": "4", "spark.ui.enabled": "false"},
        )
    )
    yield session
    session.stop()


def demo_config(tmp, *overrides):
    from dl_pipeline.config import load_config

    return load_config(DEMO_CONF, [
        f"data.train_path={AG_TRAIN}",
        f"data.test_path={AG_TEST}",
        f"prepare.output_path={tmp}/prepared",
        f"train.data_path={tmp}/prepared",
        f"train.run_dir={tmp}/run",
        "shard.max_workers=2",
        "train.progress=false",
        *overrides,
    ])


def paused_pids(proc, pause_dir, seconds: float = 300) -> list[int]:
    """Wait until a process paused by ``testhooks.wait_to_be_killed`` has announced its pid in
    ``pause_dir`` (the file written under a hidden name, then renamed), or ``proc`` ended;
    returns the announced pids."""
    import time

    def pids():
        return [int(f) for f in os.listdir(pause_dir) if f.isdigit()] if os.path.isdir(pause_dir) else []

    deadline = time.time() + seconds
    while not pids() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    return pids()


def published(out):
    """The local directory that holds the dataset published at ``out`` (its manifest's ``root``)."""
    import json

    with open(os.path.join(str(out), "manifest.json")) as fh:
        return os.path.join(str(out), json.load(fh)["root"])


def shard_digests(out):
    """{split/part-N.parquet: sha256} of the shards of the dataset published at ``out``."""
    import glob
    import hashlib

    root = published(out)
    return {os.path.relpath(p, root): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(f"{root}/*/*.parquet")) if "/rejects/" not in p}


@pytest.fixture(scope="session")
def ag_prepared(spark, tmp_path_factory):
    """(config, manifest) for the bundled AG News sample, prepared once per session."""
    from dl_pipeline.prepare import prepare_dataset

    tmp = tmp_path_factory.mktemp("ag")
    cfg = demo_config(tmp)
    return cfg, prepare_dataset(spark, cfg)


@pytest.fixture(scope="session")
def ag_model(ag_prepared, tmp_path_factory):
    """(config, metrics) of a fastText model trained 2 epochs in-process on the AG sample."""
    from dl_pipeline.config import replace
    from dl_pipeline.train.driver import train_model

    cfg, _ = ag_prepared
    run = tmp_path_factory.mktemp("ag_run")
    cfg = replace(cfg, train={"launcher": "local", "epochs": 2, "run_dir": str(run)})
    return cfg, train_model(cfg)


def read_split(root, split, columns=None, shard=0, shards=1):
    """{column: array [rows, *shape]} of one prepared split, read the way training reads it:
    Petastorm's ``make_batch_reader`` over the shard's row groups, in file order."""
    import numpy as np

    from dl_pipeline import dataset
    from dl_pipeline.train.data import row_groups

    schema = dataset.read_manifest(str(root))["schema"]
    columns = list(columns or schema)
    shapes = {c: schema[c]["shape"] for c in columns}
    url = dataset.split_url(str(root), split)
    with row_groups(url, columns, shapes, shard, shards, epochs=1, seed=0, shuffle=False, workers=1) as groups:
        parts = list(groups)
    if not parts:
        return {c: np.zeros((0,)) for c in columns}
    return {c: np.concatenate([p[c] for p in parts]) for c in columns}
