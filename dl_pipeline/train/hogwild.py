"""HOGWILD! (Niu et al. 2011) inside a rank: ``hogwild.workers`` processes share the model.

The rank process puts the model in shared memory and starts the workers; each applies its own
optimizer's updates to the shared parameters without locks while reading its own sub-shard
(shard ``rank * workers + w`` of ``size * workers``). Work goes in rounds of at most
``hogwild.sync_every`` steps per worker: after a round the rank averages the parameters with the
other ranks (one allreduce per tensor) before releasing the next. ``HogwildSteps`` runs an epoch's
steps for the shared epoch loop (``epochs.py``), exactly like ``SyncSteps`` does for sync mode.

A worker that dies (killed, out of memory) fails the rank within ``POLL_S`` seconds with its
exit code instead of leaving the others waiting.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Callable

POLL_S = 1.0


def _worker(w: int, rank: int, size: int, spec, model, commands, results) -> None:
    """Worker ``w``: runs rounds of steps on the shared ``model`` until told to stop."""
    import contextlib

    import numpy as np
    import torch

    from dl_pipeline.train.data import train_stream
    from dl_pipeline.train.loop import schedule_of, train_one_epoch
    from dl_pipeline.train.optim import build_optimizer

    torch.set_num_threads(1)
    workers = spec.hogwild_workers
    shard = rank * workers + w
    torch.manual_seed(spec.seed + shard)
    np.random.seed(spec.seed + shard)
    optimizer = build_optimizer(spec, model)
    lr = schedule_of(spec)
    stream, batches, epoch_open = contextlib.ExitStack(), None, None
    try:
        while True:
            cmd = commands.get()
            if cmd is None:
                break
            epoch, skip, first_step, n = cmd
            if epoch != epoch_open:
                stream.close()
                batches = stream.enter_context(train_stream(
                    f"{spec.data_url}/train", spec.columns, spec.shapes, shard, size * workers, epoch=epoch,
                    seed=spec.seed, batch_size=spec.batch_size, buffer_rows=spec.shuffle_buffer,
                    workers=spec.reader_workers, skip=skip,
                ))
                epoch_open = epoch
            stats = train_one_epoch(model, optimizer, batches, n, first_step + w, lr, torch.device("cpu"),
                                    step_stride=workers)
            results.put((w, stats))
    finally:
        stream.close()


class HogwildSteps:
    """Runs an epoch's steps with ``spec.hogwild_workers`` lock-free processes (CPU only)."""

    def __init__(self, spec, model, comm, device):
        if device.type != "cpu":
            raise RuntimeError("train.mode=hogwild runs on CPU (shared-memory SGD); set train.device=cpu")
        self.spec, self.model, self.comm = spec, model, comm
        self.optimizer = None  # each worker has its own; checkpoints hold the shared weights only
        self.procs: list = []

    def start(self) -> None:
        """Start the workers (after a resume has loaded the weights they share)."""
        import torch.multiprocessing as mp

        self.model.share_memory()
        ctx = mp.get_context("spawn")
        spec, rank, size = self.spec, self.comm.rank, self.comm.size
        self.commands = [ctx.Queue() for _ in range(spec.hogwild_workers)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(w, rank, size, spec, self.model, self.commands[w], self.results), daemon=True,
                                  name=f"hogwild-{w}") for w in range(spec.hogwild_workers)]
        for proc in self.procs:
            proc.start()

    def _gather(self) -> list[dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        while len(out) < len(self.procs):
            try:
                w, stats = self.results.get(timeout=POLL_S)
                out[w] = stats
            except queue.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    i, code = dead[0]
                    raise RuntimeError(f"hogwild worker {i} of rank {self.comm.rank} died (exit code {code})") from None
        return [out[w] for w in sorted(out)]

    def run(self, epoch: int, first_step: int, steps: int, skip: int, on_step: Callable | None) -> dict[str, Any]:
        """``steps`` rank steps of ``epoch``, shared by the workers in rounds (global step
        numbers ``first_step`` ...); ``skip`` steps of the epoch were done before a resume."""
        import torch

        workers, every = self.spec.hogwild_workers, self.spec.hogwild_sync_every
        done, totals, t0 = 0, {"loss_sum": 0.0, "samples": 0, "data_s": 0.0}, time.perf_counter()
        while done < steps:
            ran = min(every * workers, steps - done)  # this round's steps, dealt to the workers
            for w, q in enumerate(self.commands):
                q.put((epoch, skip // workers, first_step + done, ran // workers + (w < ran % workers)))
            round_stats = self._gather()
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    self.comm.average_(param.data, f"hogwild.{name}")
            done += ran
            loss_sum = sum(s["loss_sum"] for s in round_stats)
            samples = sum(s["samples"] for s in round_stats)
            totals["loss_sum"] += loss_sum
            totals["samples"] += samples
            totals["data_s"] += sum(s["data_s"] for s in round_stats) / workers
            if on_step is not None:
                on_step(first_step + done, ran, loss_sum / max(1, samples), None, samples)
        return {**totals, "steps": done, "step_s": time.perf_counter() - t0}

    def close(self) -> None:
        for q in getattr(self, "commands", []):
            q.put(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
