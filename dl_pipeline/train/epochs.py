"""The function every rank runs, and the one epoch loop that sync and Hogwild training share.

``run_rank(spec)`` takes a RankSpec (spec.py) and imports torch and horovod inside, so the same
function is shipped by ``horovod.spark.run``, started by ``horovodrun`` (``python -m
dl_pipeline.train.epochs SPEC.json RESULT.json``) or called in-process (launcher local).

Per epoch a *stepper* runs the epoch's optimizer steps (``SyncSteps``: this process, gradients
averaged by Horovod; ``HogwildSteps``: lock-free worker processes, parameters averaged per
round); everything else happens here, once, for both: LR warm-up and decay, step logging and
progress, mid-epoch and epoch checkpoints, resume, evaluation, best-model tracking and early
stopping. Rank 0 alone logs and writes; every rank's data seed is ``seed + rank``.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from dl_pipeline.train.spec import RankSpec

log = logging.getLogger("dl_pipeline.train")


def _device(choice: str, comm):
    import torch

    if getattr(comm, "device", None) is not None and comm.device.type == "cuda":
        return comm.device  # TorchComm bound NCCL to the GPU TorchDistributor gave this rank
    if _wants_cuda(choice):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible on this executor")
        torch.cuda.set_device(comm.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _wants_cuda(choice: str) -> bool:
    import torch

    return choice == "cuda" or (choice == "auto" and torch.cuda.is_available())


def _threads(comm) -> int:
    """Compute threads for this rank: its machine's cores shared by the ranks on it."""
    return max(1, (os.cpu_count() or 1) // max(1, comm.local_size))


class SyncSteps:
    """Runs an epoch's steps in this process; Horovod averages the gradients across ranks."""

    def __init__(self, spec: RankSpec, model, comm, device):
        from dl_pipeline.train.optim import build_optimizer

        self.spec, self.model, self.comm, self.device = spec, model, comm, device
        self.optimizer = comm.distributed_optimizer(build_optimizer(spec, model), model, spec.fp16_allreduce)

    def start(self, first_epoch: int, skip: int, held=None) -> None:
        """Open the batch feed at ``first_epoch``, ``skip`` steps in (a mid-epoch resume);
        ``held``: a Future of this rank's train shard already being read (data.preload)."""
        import contextlib

        from dl_pipeline.train.data import train_batches

        s, c = self.spec, self.comm
        self._stack = contextlib.ExitStack()
        self.batches = self._stack.enter_context(train_batches(
            f"{s.data_url}/train", s.columns, s.shapes, c.rank, c.size, first_epoch=first_epoch, epochs=s.epochs,
            steps_per_epoch=lambda _: s.steps_per_epoch, seed=s.seed, batch_size=s.batch_size,
            buffer_rows=s.shuffle_buffer, workers=s.reader_workers, pin=self.device.type == "cuda", skip=skip,
            resident=held if held is not None else s.resident, reader=s.reader,
        ))

    def run(self, epoch: int, first_step: int, steps: int, on_step) -> dict[str, Any]:
        from dl_pipeline.train.loop import schedule_of, train_one_epoch

        stats = train_one_epoch(self.model, self.optimizer, self.batches, steps, first_step, schedule_of(self.spec),
                                self.device, on_step, label_smoothing=self.spec.label_smoothing)
        return {**stats, "steps": steps}

    def close(self) -> None:
        if hasattr(self, "_stack"):
            self._stack.close()


def evaluate_split(spec: RankSpec, split: str, model, comm, device, held: dict | None = None) -> tuple[dict, Any]:
    """(accuracy, loss, rows) of ``split`` over all ranks' shards, and its confusion [K, K].
    ``held``: split -> this rank's shard in memory; a resident run (spec.resident) reads ``val``,
    which every epoch evaluates, once and keeps it there."""
    from dl_pipeline.train.data import ResidentShard, eval_stream
    from dl_pipeline.train.loop import evaluate, summarize_eval

    url = f"{spec.data_url}/{split}"
    if held is not None and spec.resident and split == "val" and split not in held:
        held[split] = ResidentShard.read(url, spec.columns, spec.shapes, comm.rank, comm.size, spec.reader)
    with eval_stream(url, spec.columns, spec.shapes, comm.rank, comm.size, batch_size=max(256, spec.batch_size),
                     workers=spec.reader_workers, pin=device.type == "cuda",
                     held=(held or {}).get(split), reader=spec.reader) as batches:
        sums = evaluate(model, batches, spec.num_classes, device)
    sums = {k: comm.allreduce_sum(v, f"eval.{split}.{k}") for k, v in sums.items()}
    return summarize_eval(sums), sums["confusion"]


class _StepLog:
    """on_step for the steppers: step records, the progress line, mid-epoch checkpoints, the
    crash hook. ``done`` is the global step count after a call that ran ``ran`` steps."""

    def __init__(self, spec: RankSpec, comm, metrics_log, save_mid_epoch):
        self.spec, self.comm, self.metrics_log, self.save = spec, comm, metrics_log, save_mid_epoch
        self.progress = spec.progress and comm.is_root and sys.stderr.isatty()  # decided here, on the rank
        self.t, self.n = time.perf_counter(), 0

    def __call__(self, done: int, ran: int, loss: float, lr: float | None, rows: int) -> None:
        s = self.spec
        self.n += rows * self.comm.size

        def crossed(every: int) -> bool:
            return every > 0 and done // every > (done - ran) // every

        if self.comm.is_root and (crossed(s.log_every_steps) or done == s.total_steps):
            dt = time.perf_counter() - self.t
            rate = self.n / dt if dt > 0 else 0.0
            record = {"type": "step", "step": done, "loss": loss, "samples_per_s": rate}
            if lr is not None:
                record["lr"] = lr
            self.metrics_log.write(record)
            if self.progress:
                print(f"\rstep {done}/{s.total_steps} loss {loss:.4f} {rate:,.0f} samples/s", end="", file=sys.stderr, flush=True)
            self.t, self.n = time.perf_counter(), 0
        if crossed(s.checkpoint_every_steps) and done % s.steps_per_epoch:
            self.save(done)
        if s.fail_at_step and done >= s.fail_at_step > done - ran and self.comm.rank == self.comm.size - 1:
            # test hook: the last rank dies mid-epoch, a real SIGKILL (no clean-up), like a lost executor
            os.kill(os.getpid(), signal.SIGKILL)


def run_rank(spec: RankSpec) -> dict[str, Any] | None:
    """Train on this rank's shard; returns the final metrics on rank 0, None elsewhere."""
    import numpy as np
    import torch

    from dl_pipeline.errors import UserError
    from dl_pipeline.logs import quiet_libraries
    from dl_pipeline.models import build_model
    from dl_pipeline.train import checkpoint
    from dl_pipeline.train.comm import open_comm
    from dl_pipeline.train.loop import NonFiniteLoss
    from dl_pipeline.train.outputs import MetricsLog

    t_start = time.perf_counter()
    # Petastorm pulls in pandas (~0.6 s of imports): done while Horovod starts and the model is
    # built, not inside the first step's wait for data.
    if spec.reader == "petastorm":
        threading.Thread(target=importlib.import_module, args=("petastorm",), daemon=True).start()
    comm = open_comm(spec.comm, cuda=_wants_cuda(spec.device))
    held_train = None
    if spec.resident and spec.mode == "sync":  # Hogwild workers read their own sub-shards
        from dl_pipeline.train.data import preload

        held_train = preload(f"{spec.data_url}/train", spec.columns, spec.shapes, comm.rank, comm.size, spec.reader)
    if comm.is_root:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s rank0: %(message)s", stream=sys.stderr)
    quiet_libraries()
    torch.manual_seed(spec.seed)  # identical initial weights before the broadcast, too
    np.random.seed(spec.seed + comm.rank)
    device = _device(spec.device, comm)
    torch.set_num_threads(_threads(comm))
    model = build_model(spec.model_spec)
    if spec.transfer:
        from dl_pipeline.train.transfer import warm_start

        warm_start(model, spec.model_spec["name"], spec.transfer)
    model = model.to(device)
    if spec.mode == "hogwild":
        from dl_pipeline.train.hogwild import HogwildSteps

        stepper = HogwildSteps(spec, model, comm, device)
    else:
        stepper = SyncSteps(spec, model, comm, device)

    state = {"epoch": 0, "global_step": 0, "best_val_loss": float("inf"), "bad_epochs": 0, "history": [],
             "plan": checkpoint.plan_of(spec)}
    if spec.resume and comm.is_root:
        loaded = checkpoint.load_latest(spec.run_dir, model, stepper.optimizer)
        if loaded:
            state.update(loaded)
            log.info("resumed from step %d (epoch %d)", state["global_step"], state["epoch"])
    state = comm.broadcast_object(state, "state")
    comm.broadcast_model(model, stepper.optimizer)
    metrics_log = MetricsLog(spec.run_dir) if comm.is_root else None

    def save_mid_epoch(done: int) -> None:
        if comm.is_root:
            checkpoint.save(spec.run_dir, model, stepper.optimizer, {**state, "global_step": done})

    on_step = _StepLog(spec, comm, metrics_log, save_mid_epoch)
    steps = spec.steps_per_epoch
    in_epoch = state["global_step"] - state["epoch"] * steps  # > 0 only after a mid-epoch resume
    stepper.start(state["epoch"], in_epoch, held_train)
    held: dict = {}  # split -> this rank's shard in memory (evaluate_split)
    clock = {"setup_s": time.perf_counter() - t_start, "train_steps_s": 0.0}
    try:
        while state["epoch"] < spec.epochs:
            epoch = state["epoch"]
            try:
                stats = stepper.run(epoch, state["global_step"], (epoch + 1) * steps - state["global_step"], on_step)
            except NonFiniteLoss as exc:
                if not comm.distributed and spec.mode == "sync":
                    raise UserError(str(exc)) from None
                raise RuntimeError(str(exc)) from None
            state["global_step"] = (epoch + 1) * steps
            clock["train_steps_s"] += stats["step_s"]
            if _end_of_epoch(spec, model, stepper.optimizer, comm, device, state, stats, metrics_log, held):
                break
    finally:
        stepper.close()
    return comm.conclude(_finish(spec, model, comm, device, state, {**clock, "t_start": t_start}, held))


def _end_of_epoch(spec: RankSpec, model, optimizer, comm, device, state: dict, stats: dict, metrics_log,
                  held: dict) -> bool:
    """Evaluate, track the best model, log, checkpoint; returns True to stop early."""
    import torch

    from dl_pipeline.train import checkpoint

    epoch = state["epoch"]
    val, _ = evaluate_split(spec, "val", model, comm, device, held)
    # [loss sum, samples, each rank's data wait fraction (one-hot: a sum gathers them)]
    local = torch.zeros(2 + comm.size, dtype=torch.float64)
    local[0], local[1] = stats["loss_sum"], float(stats["samples"])
    wait = stats["data_s"] / max(stats["step_s"], 1e-9)
    local[2 + comm.rank] = wait
    sums = comm.allreduce_sum(local, f"train.{epoch}")
    train_loss = float(sums[0]) / max(1.0, float(sums[1]))
    improved = val["loss"] < state["best_val_loss"] - 1e-6
    state["best_val_loss"] = min(state["best_val_loss"], val["loss"])
    state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
    state["epoch"] = epoch + 1
    record = {
        "type": "epoch", "epoch": epoch + 1, "step": state["global_step"], "train_loss": train_loss,
        "val_loss": val["loss"], "val_accuracy": val["accuracy"],
        "data_wait_fraction": wait,  # rank 0's (only rank 0 writes the record)
        "data_wait_fraction_per_rank": [round(float(v), 4) for v in sums[2:]],
        "samples_per_s": float(sums[1]) / max(stats["step_s"], 1e-9),
    }
    state["history"].append(record)
    if comm.is_root:
        if spec.progress and sys.stderr.isatty():
            print(file=sys.stderr)
        log.info("epoch %d: train_loss %.4f val_loss %.4f val_acc %.4f (%.0f samples/s, data wait %.1f%%)", epoch + 1,
                 train_loss, val["loss"], val["accuracy"], record["samples_per_s"], 100 * record["data_wait_fraction"])
        metrics_log.write(record)
        checkpoint.save(spec.run_dir, model, optimizer, state)
        if improved:
            checkpoint.save_best(spec.run_dir, model)
    if spec.early_stopping_patience and state["bad_epochs"] >= spec.early_stopping_patience:
        if comm.is_root:
            log.info("early stopping after epoch %d (val loss did not improve for %d epochs)", epoch + 1, state["bad_epochs"])
        return True
    return False


def _peak_rss_mb() -> float:
    """This process's peak resident memory, or its Hogwild workers' if larger (MiB)."""
    import resource

    kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return kib / 1024


def _finish(spec: RankSpec, model, comm, device, state: dict, clock: dict, held: dict) -> dict[str, Any] | None:
    """Reload the best weights, evaluate val and test on all ranks, rank 0 writes the outputs.

    ``clock``: this rank's ``t_start`` (perf_counter), ``setup_s`` (start to the first step's
    call) and ``train_steps_s`` (seconds inside the epochs' steps, data waits included)."""
    import torch

    from dl_pipeline.train import checkpoint
    from dl_pipeline.train.outputs import write_outputs

    if comm.is_root:
        checkpoint.load_best(spec.run_dir, model)
    comm.broadcast_model(model)
    val, _ = evaluate_split(spec, "val", model, comm, device, held)
    if spec.test_rows:
        test, confusion = evaluate_split(spec, "test", model, comm, device)
    else:
        test, confusion = {"accuracy": None, "loss": None, "rows": 0}, None
    rss = torch.zeros(comm.size, dtype=torch.float64)
    rss[comm.rank] = _peak_rss_mb()
    rss = comm.allreduce_sum(rss, "peak_rss")
    if not comm.is_root:
        return None
    metrics = {
        "peak_rss_mb_per_rank": [round(float(v), 1) for v in rss],
        "timing": {"rank_setup_s": round(clock["setup_s"], 3), "train_steps_s": round(clock["train_steps_s"], 3),
                   "rank_total_s": round(time.perf_counter() - clock["t_start"], 3)},
        "val": val,
        "test": test,
        "epochs_run": state["epoch"],
        "global_step": state["global_step"],
        "world_size": comm.size,
        "mode": spec.mode,
        "history": state["history"],
    }
    write_outputs(spec, model.cpu(), metrics, None if confusion is None else confusion.tolist())
    return metrics


def main(argv: list[str] | None = None) -> int:
    """horovodrun entry: ``python -m dl_pipeline.train.epochs SPEC.json [RESULT.json]``."""
    import json

    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as fh:
        spec = RankSpec.from_json(fh.read())
    result = run_rank(spec)
    if result is not None and len(argv) > 1:
        with open(argv[1], "w") as fh:
            json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
