"""One SparkSession factory for every entry point.

Under spark-submit or on Databricks a session already exists and is reused untouched (its
cluster settings belong to the cluster). Otherwise a local session is started, bound to
loopback so a laptop or CI machine never opens a port on another address.
"""

from __future__ import annotations

import os
import sys

from dl_pipeline.config import SparkConfig

# The Python workers' environment, in a session we start (spark.executorEnv.*; on a cluster,
# set it in the cluster's Spark config). Arrow's mimalloc asks the OS for 2 MiB pages
# (transparent huge pages, where the kernel grants them on request): prepare's tasks copy each
# row's strings ~3 times through buffers of tens of MB, each fresh from the OS, and in 4 KiB
# pages faulting them in cost 5x the copy (an 80 MB concatenation: 76-89 ms against 16 ms).
# mimalloc reads it when pyarrow loads: it cannot be set from a task. glibc's malloc (Python's
# bytes and str, numpy's arrays) does the same with ``glibc.malloc.hugetlb=1`` (glibc >= 2.35;
# older ones ignore it): the tasks read their input 16 MB at a time, and counting a split's lines
# took 0.41 against 0.69 CPU-us/row, reading them 0.93 against 1.20 (AG News). Both are read at process
# start: they cannot be set from a task. bench/README.md.
WORKER_ENV = {"MIMALLOC_LARGE_OS_PAGES": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}

# Settings for a session we start ourselves. Arrow makes pandas_udf / toPandas columnar.
_LOCAL_DEFAULTS = {
    "spark.driver.host": "127.0.0.1",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.enabled": "false",
    # Spark's own stage progress bar (one line, redrawn) where a person watches: see get_spark.
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
    # Scoring overwrites one dt=... partition per run, never the whole table.
    "spark.sql.sources.partitionOverwriteMode": "dynamic",
    "spark.driver.memory": "2g",
    **{f"spark.executorEnv.{k}": v for k, v in WORKER_ENV.items()},
}


def _worker_daemon_conf(python: str) -> dict[str, str]:
    """``spark.python.daemon.module`` for a local session, where it pays and is safe.

    Saves per Python task ~80 ms of CPU on Python < 3.12 (CPython gh-103200) and a full garbage
    collection (~27 ms with pandas and pyarrow loaded) on any version; see dl_pipeline/pyworker.py. The
    workers' interpreter must import dl_pipeline on its own (an installed or checked-out
    package, not a later ``addPyFile``), or no Python task could run: checked once here
    (~50 ms) rather than assumed.
    """
    import subprocess

    try:
        ok = subprocess.run([python, "-c", "import dl_pipeline.pyworker"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return {"spark.python.daemon.module": "dl_pipeline.pyworker"} if ok else {}


def _quiet_jvm_conf() -> dict[str, str]:
    """The JVMs of a session we start log warnings and errors only (``log4j2.properties`` beside
    this module), without Spark's start-up banner; set either key in ``spark.conf`` to keep yours."""
    opt = "-Dlog4j2.configurationFile=file:" + os.path.join(os.path.dirname(os.path.abspath(__file__)), "log4j2.properties")
    return {"spark.driver.extraJavaOptions": opt, "spark.executor.extraJavaOptions": opt}


def active_session():
    """Return the already-running SparkSession (spark-submit, Databricks, tests) or None."""
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession()


def get_spark(cfg: SparkConfig | None = None):
    """Return the active SparkSession, or start one from ``cfg`` bound to 127.0.0.1."""
    from pyspark.sql import SparkSession

    existing = active_session()
    if existing is not None:
        return existing
    cfg = cfg or SparkConfig()
    if os.environ.get("PYSPARK_GATEWAY_PORT"):
        # Launched by spark-submit (or a notebook kernel): the launcher's --master and --conf
        # win; setting master here would silently turn a cluster job into a local one.
        builder = SparkSession.builder.appName(cfg.app_name)
        for key, value in cfg.conf.items():
            builder = builder.config(key, value)
        spark = builder.getOrCreate()
        return spark
    master = cfg.master
    # Keep the JVM and Python workers on loopback; an inherited value wins (cluster launchers).
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        # Executors must run the same interpreter (and venv) as the driver.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.master(master).appName(cfg.app_name)
    settings = {**_LOCAL_DEFAULTS, **_quiet_jvm_conf(),
                **_worker_daemon_conf(cfg.conf.get("spark.pyspark.python", os.environ["PYSPARK_PYTHON"]))} if master.startswith("local") else {}
    if settings and sys.stderr.isatty():
        settings["spark.ui.showConsoleProgress"] = "true"
    settings.update(cfg.conf)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def hadoop_path(spark, url: str):
    """(Hadoop FileSystem, Path) for a URL: the filesystems and credentials Spark writes with."""
    path = spark._jvm.org.apache.hadoop.fs.Path(url)
    return path.getFileSystem(spark._jsc.hadoopConfiguration()), path


def hadoop_delete(spark, url: str) -> None:
    """Delete a file or directory tree; a missing path is fine."""
    fs, path = hadoop_path(spark, url)
    fs.delete(path, True)
