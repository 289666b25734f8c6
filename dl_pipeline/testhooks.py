"""Hooks the fault tests use to stop a real process at a chosen point and kill it there."""

from __future__ import annotations

import os
import time


def wait_to_be_killed(pause_dir: str, seconds: float = 300) -> None:
    """Announce this process's pid as a file in ``pause_dir`` (written whole, then renamed),
    then wait for the test to kill it with a signal, or to let it go on by deleting that file."""
    os.makedirs(pause_dir, exist_ok=True)
    tmp = os.path.join(pause_dir, f".{os.getpid()}")
    announced = os.path.join(pause_dir, str(os.getpid()))
    with open(tmp, "w") as fh:
        fh.write(str(os.getpid()))
    os.rename(tmp, announced)
    deadline = time.monotonic() + seconds
    while os.path.exists(announced) and time.monotonic() < deadline:
        time.sleep(0.05)
