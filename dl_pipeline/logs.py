"""Logging set-up shared by the CLI, jobs and Horovod ranks."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_dl_pipeline", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        handler._dl_pipeline = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    quiet_libraries()


def quiet_libraries() -> None:
    """Libraries' INFO chatter (Petastorm's "Failed loading Unischema" for plain Parquet, ...) off."""
    for noisy in ("py4j", "petastorm", "pyarrow", "matplotlib", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
