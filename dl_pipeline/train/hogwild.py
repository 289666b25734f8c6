"""HOGWILD! (Niu et al. 2011) inside a rank: ``hogwild.workers`` processes share the model.

The rank process puts the model in shared memory and starts the workers; each applies its own
optimizer's updates to the shared parameters without locks while reading its own sub-shard
(shard ``rank * workers + w`` of ``size * workers``). Work goes in rounds of at most
``hogwild.sync_every`` steps per worker: after a round the rank averages the parameters with the
other ranks (one allreduce per tensor) before releasing the next. ``HogwildSteps`` runs an epoch's
steps for the shared epoch loop (``epochs.py``), exactly like ``SyncSteps`` does for sync mode.

A worker that dies (killed, out of memory) fails the rank within ``POLL_S`` seconds with its
exit code instead of leaving the others waiting; a worker whose rank died exits as soon.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Callable

POLL_S = 1.0


def worker_steps(steps: int, workers: int, w: int) -> int:
    """How many of ``steps`` rank steps worker ``w`` runs when they are dealt out in rounds
    (``HogwildSteps.run``): every full round gives each worker the same count, and the last
    round's remainder goes to the lowest-numbered workers."""
    return steps // workers + (w < steps % workers)


def _worker(w: int, rank: int, size: int, spec, model, first_epoch: int, skip: int, commands, results,
            local_size: int = 1) -> None:
    """Worker ``w``: runs rounds of steps on the shared ``model`` until told to stop. Its
    batches come from its own sub-shard, epochs back to back (data.train_batches), made in a
    background thread only where the machine has a core to spare beyond one per worker:
    otherwise that thread contends with the workers' steps (AG sample, 2 cores, 2 workers:
    ~80k samples/s with batches made between steps, 73-79k with a data thread per worker)."""
    import multiprocessing as mp
    import os

    import numpy as np
    import torch

    from dl_pipeline.train.data import train_batches
    from dl_pipeline.train.loop import schedule_of, train_one_epoch
    from dl_pipeline.train.optim import build_optimizer

    torch.set_num_threads(1)
    workers, steps = spec.hogwild_workers, spec.steps_per_epoch
    shard = rank * workers + w
    torch.manual_seed(spec.seed + shard)
    np.random.seed(spec.seed + shard)
    optimizer = build_optimizer(spec, model)
    lr = schedule_of(spec)
    skipped = worker_steps(skip, workers, w)  # what this worker ran of the first epoch before a resume

    def per_epoch(epoch: int) -> int:
        if epoch == first_epoch:
            return skipped + worker_steps(steps - skip, workers, w)
        return worker_steps(steps, workers, w)

    with train_batches(f"{spec.data_url}/train", spec.columns, spec.shapes, shard, size * workers,
                       first_epoch=first_epoch, epochs=spec.epochs, steps_per_epoch=per_epoch, seed=spec.seed,
                       batch_size=spec.batch_size, buffer_rows=spec.shuffle_buffer, workers=spec.reader_workers,
                       skip=skipped, resident=spec.resident, reader=spec.reader,
                       background=(os.cpu_count() or 1) > workers * local_size) as batches:
        while True:
            try:
                cmd = commands.get(timeout=POLL_S)
            except queue.Empty:
                if not mp.parent_process().is_alive():  # the rank was killed: do not linger
                    return
                continue
            if cmd is None:
                break
            first_step, n = cmd
            stats = train_one_epoch(model, optimizer, batches, n, first_step + w, lr, torch.device("cpu"),
                                    step_stride=workers, label_smoothing=spec.label_smoothing)
            results.put((w, stats))


class HogwildSteps:
    """Runs an epoch's steps with ``spec.hogwild_workers`` lock-free processes (CPU only)."""

    def __init__(self, spec, model, comm, device):
        if device.type != "cpu":
            raise RuntimeError("train.mode=hogwild runs on CPU (shared-memory SGD); set train.device=cpu")
        self.spec, self.model, self.comm = spec, model, comm
        self.optimizer = None  # each worker has its own; checkpoints hold the shared weights only
        self.procs: list = []

    def start(self, first_epoch: int, skip: int, held=None) -> None:
        """Start the workers at ``first_epoch``, ``skip`` steps in (after a resume has loaded
        the weights they share). ``held`` is not used: each worker reads its own sub-shard."""
        import torch.multiprocessing as mp

        self.model.share_memory()
        ctx = mp.get_context("spawn")
        spec, rank, size = self.spec, self.comm.rank, self.comm.size
        self.commands = [ctx.Queue() for _ in range(spec.hogwild_workers)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, daemon=True, args=(w, rank, size, spec, self.model, first_epoch, skip,
                                                                     self.commands[w], self.results, self.comm.local_size),
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

    def run(self, epoch: int, first_step: int, steps: int, on_step: Callable | None) -> dict[str, Any]:
        """``steps`` rank steps of ``epoch`` (global step numbers ``first_step`` ...), dealt
        to the workers in rounds of at most ``hogwild.sync_every`` steps each."""
        import torch

        workers, every = self.spec.hogwild_workers, self.spec.hogwild_sync_every
        done, totals, t0 = 0, {"loss_sum": 0.0, "samples": 0, "data_s": 0.0}, time.perf_counter()
        while done < steps:
            ran = min(every * workers, steps - done)  # this round's steps, dealt to the workers
            for w, q in enumerate(self.commands):
                q.put((first_step + done, worker_steps(ran, workers, w)))
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
