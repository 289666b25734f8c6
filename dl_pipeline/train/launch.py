"""Launchers (driver-side): start the ranks of one RankSpec and return rank 0's metrics.

  * ``spark``      ``horovod.spark.run`` runs one rank per Spark task (Gloo on CPU, NCCL on GPU);
  * ``horovodrun`` ``horovodrun --gloo -np N -H ...`` on plain hosts;
  * ``torch_distributor`` pyspark's TorchDistributor: torch.distributed ranks (Gloo on CPU, NCCL
    on GPU) as Spark barrier tasks, for runtimes without Horovod (Spark 4, Databricks 16.4+);
  * ``local``      one in-process rank, no Horovod (debugging, and the 1-rank benchmark).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from dl_pipeline.config import Config
from dl_pipeline.train.spec import RankSpec


def launch_local(spec: RankSpec, cfg: Config, n: int, spark) -> dict[str, Any]:
    from dl_pipeline.train.epochs import run_rank

    return run_rank(spec)


def launch_spark(spec: RankSpec, cfg: Config, n: int, spark) -> dict[str, Any]:
    import horovod.spark

    from dl_pipeline.train.epochs import run_rank

    master = spark.sparkContext.master
    nics = set(cfg.horovod.nics) or ({"lo"} if master.startswith("local") else None)
    with _quiet_job_cancellation():
        try:
            results = horovod.spark.run(
                run_rank, args=(spec,), num_proc=n, start_timeout=cfg.horovod.start_timeout_s, use_gloo=True,
                verbose=cfg.horovod.verbose, nics=nics, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except Exception as exc:
            raise RuntimeError(_rank_failure(str(exc))) from exc
    return next(r for r in results if r is not None)


def _rank_failure(message: str) -> str:
    """Horovod's "... The first process to do so was: Process name: 1 Exit code: 137" -> "rank 1
    died (exit code 137: SIGKILL)"; any other message as it is."""
    import re

    m = re.search(r"Process name: (\S+)\s+Exit code: (-?\d+)", message)
    if not m:
        return message
    code = int(m.group(2))
    sig = code - 128 if code > 128 else -code if code < 0 else 0
    return f"rank {m.group(1)} died (exit code {code}{_signal_name(sig)})"


def _signal_name(sig: int) -> str:
    """": SIGKILL" for 9; "" for 0 and numbers with no name (real-time signals)."""
    import signal

    try:
        return f": {signal.Signals(sig).name}" if sig > 0 else ""
    except ValueError:
        return ""


@contextlib.contextmanager
def _quiet_job_cancellation():
    """When a rank dies, Horovod cancels its Spark job, and the thread that waited on that job
    prints the cancellation as a traceback. The failure itself is reported once, by the driver;
    that traceback only hides it. Other exceptions in threads are printed as usual."""
    import threading

    previous = threading.excepthook

    def hook(args):
        if "cancelled part of cancelled job group horovod.spark.run" not in str(args.exc_value):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def launch_horovodrun(spec: RankSpec, cfg: Config, n: int, spark) -> dict[str, Any]:
    hosts = cfg.horovod.hosts or f"localhost:{n}"
    with tempfile.TemporaryDirectory(prefix="dl-train-") as tmp:
        sfile, rfile = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(sfile, "w") as fh:
            fh.write(spec.to_json())
        horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
        cmd = [horovodrun, "--gloo", "-np", str(n), "-H", hosts, "--start-timeout", str(cfg.horovod.start_timeout_s)]
        if cfg.horovod.nics:
            cmd += ["--network-interface", ",".join(cfg.horovod.nics)]
        elif hosts.startswith("localhost"):
            cmd += ["--network-interface", "lo"]
        cmd += [sys.executable, "-m", "dl_pipeline.train.epochs", sfile, rfile]
        # horovodrun's stderr is passed through as it comes and its tail kept: it names the
        # first rank that died, which the failure line repeats
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace")
        tail: collections.deque[str] = collections.deque(maxlen=200)
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)
        if proc.wait() != 0:
            text = "".join(tail)
            raise RuntimeError(_rank_failure(text) if "Process name:" in text else f"horovodrun exited with status {proc.returncode}")
        with open(rfile) as fh:
            return json.load(fh)





def _torch_rank(spec: RankSpec) -> dict[str, Any] | None:
    """What each TorchDistributor process runs (pickled by reference: this module's function)."""
    from dl_pipeline.train.epochs import run_rank

    return run_rank(spec)


def launch_torch_distributor(spec: RankSpec, cfg: Config, n: int, spark) -> dict[str, Any]:
    """``pyspark.ml.torch.distributor.TorchDistributor`` runs ``n`` ranks with torch.distributed
    (Gloo on CPU, NCCL on GPU): as Spark barrier tasks on a cluster, as local processes under a
    ``local[...]`` master. Rank 0's metrics come back; a failed rank fails the run with one line."""
    from pyspark.ml.torch.distributor import TorchDistributor

    master = spark.sparkContext.master
    local_mode = master == "local" or master.startswith("local[")
    # auto: a GPU per rank where the cluster schedules GPUs to tasks
    use_gpu = spec.device == "cuda" or (spec.device == "auto" and bool(spark.conf.get("spark.task.resource.gpu.amount", "")))
    with _quiet_job_cancellation(), _output_tail() as tail:
        try:
            result = TorchDistributor(num_processes=n, local_mode=local_mode, use_gpu=use_gpu).run(_torch_rank, spec)
            if result is None:  # a rank failed after rank 0's result was written (seen: an abort at exit)
                raise RuntimeError("a rank failed at the end of training")
            return result
        except Exception as exc:
            # local mode prints torchrun's report (which rank died, how) and raises a generic
            # error; a barrier task's error carries that report in its message
            raise RuntimeError(_torch_failure(str(exc) + "\n" + "".join(tail))) from exc


@contextlib.contextmanager
def _output_tail(lines: int = 200):
    """Keep the last ``lines`` lines written to this process's stdout and stderr, passing both
    on to stderr (TorchDistributor prints its ranks' output there: local mode to stdout, the
    barrier tasks' streamed logs to stderr; stdout stays for results, as with the other
    launchers)."""
    tail: collections.deque[str] = collections.deque(maxlen=lines)

    class Tee:
        def __init__(self, real):
            self.real = real

        def write(self, text: str) -> int:
            tail.extend(text.splitlines(keepends=True))
            return self.real.write(text)

        def __getattr__(self, name: str):
            return getattr(self.real, name)

    real = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(real[1]), Tee(real[1])
    try:
        yield tail
    finally:
        sys.stdout, sys.stderr = real


def _torch_failure(message: str) -> str:
    """TorchDistributor's errors -> one line: from torchrun's report, the root cause's "rank : 1
    (local_rank: 1) ... exitcode : -9" as "rank 1 died (exit code -9: SIGKILL)"; else the
    message's first line."""
    import re

    root = message[message.find("Root Cause"):] if "Root Cause" in message else message
    m = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", root, re.S)
    if m:
        code = int(m.group(2))
        sig = -code if code < 0 else code - 128 if code > 128 else 0
        return f"rank {m.group(1)} died (exit code {code}{_signal_name(sig)})"
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[0] if lines else "TorchDistributor failed"
LAUNCHERS = {"local": launch_local, "spark": launch_spark, "horovodrun": launch_horovodrun,
             "torch_distributor": launch_torch_distributor}
