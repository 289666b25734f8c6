"""Spark's Python worker daemon, minus two fixed costs per task: ~80 ms of CPU re-reading
archives (Python 3.10/3.11) and ~27 ms of a full garbage collection (any Python).

PySpark 3.5's worker calls ``importlib.invalidate_caches()`` at the start of every task. On
Python 3.10 and 3.11 that re-reads, in pure Python, the central directory of every zip and jar
on ``sys.path`` even when nothing changed (13 archives in a local session here: pyspark.zip,
py4j's zip and Spark's jars): CPython gh-103200, fixed in 3.12; Spark stopped calling it
needlessly in SPARK-54744 (4.x). A profile of prepare on local[2] found it in every task.

Run as ``spark.python.daemon.module=dl_pipeline.pyworker`` (``get_spark`` sets it for the local
sessions it starts, where the workers' Python can import this module). The daemon patches
``zipimporter.invalidate_caches`` to re-read an archive only when its size or modification
time changed (a new ``--py-files`` upload is still picked up), then runs ``pyspark.daemon``
with its per-task ``gc.collect()`` limited to the young generations (see _YoungGenerationGC);
forked workers inherit both patches. On a cluster, set it only where ``dl_pipeline``
is installed on the executors (the daemon starts before any ``--py-files`` are on the path).
"""

from __future__ import annotations

import gc
import os
import sys
import zipimport


def _stamp(archive: str) -> tuple[int, int] | None:
    try:
        st = os.stat(archive)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def patch_zipimport() -> None:
    """Make ``zipimporter.invalidate_caches`` a no-op for archives unchanged since last read."""
    original = getattr(zipimport.zipimporter, "invalidate_caches", None)
    if original is None or getattr(original, "_dl_pipeline", False):  # < 3.10 has none to patch
        return
    seen: dict[str, tuple[int, int] | None] = {}

    def invalidate_caches(self):
        stamp = _stamp(self.archive)
        if stamp is not None and seen.get(self.archive) == stamp:
            return
        original(self)
        seen[self.archive] = stamp

    invalidate_caches._dl_pipeline = True
    # Importers already loaded read their directory when created: that read is current.
    for importer in list(sys.path_importer_cache.values()):
        if isinstance(importer, zipimport.zipimporter):
            seen[importer.archive] = _stamp(importer.archive)
    zipimport.zipimporter.invalidate_caches = invalidate_caches


class _YoungGenerationGC:
    """``gc`` as ``pyspark.daemon`` sees it: the collection it forces after every task of a
    reused worker covers the young generations (0 and 1) only.

    A full collection walks every object the worker holds: ~27 ms of CPU per task measured
    here with pandas and pyarrow imported (90% of a trivial task), more once torch and a model
    are loaded. What a task leaves behind in reference cycles is young; objects that outlive tasks
    (modules, the cached model) are old and are still collected by Python's own thresholds.
    """

    def __getattr__(self, name: str):
        return getattr(gc, name)

    @staticmethod
    def collect(generation: int = 2) -> int:
        return gc.collect(min(generation, 1))


def patch_daemon_gc(daemon) -> None:
    """Make ``daemon``'s per-task ``gc.collect()`` a young-generation collection."""
    daemon.gc = _YoungGenerationGC()


if __name__ == "__main__":
    patch_zipimport()
    import pyspark.daemon

    patch_daemon_gc(pyspark.daemon)
    pyspark.daemon.manager()
