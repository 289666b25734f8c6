"""Executor-side training: the function every rank runs.

``run_rank(params)`` takes one picklable dict (built by the driver) and imports torch and
horovod inside, so it can be shipped by ``horovod.spark.run``, started by ``horovodrun``
(``python -m dl_pipeline.train.worker params.json``) or called in-process (launcher local).
Rank 0 alone logs, checkpoints and writes; every rank's seed is ``seed + rank``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("dl_pipeline.train")


class Comm:
    """The few collectives training needs, over Horovod or a single process."""

    def __init__(self, use_horovod: bool):
        self.hvd = None
        if use_horovod:
            import horovod.torch as hvd

            hvd.init()
            self.hvd = hvd
        self.rank = self.hvd.rank() if self.hvd else 0
        self.size = self.hvd.size() if self.hvd else 1
        self.local_rank = self.hvd.local_rank() if self.hvd else 0

    def allreduce_sum(self, tensor, name: str):
        if not self.hvd:
            return tensor
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name)

    def average_(self, tensor, name: str) -> None:
        if self.hvd:
            self.hvd.allreduce_(tensor, op=self.hvd.Average, name=name)

    def broadcast_object(self, obj, name: str):
        return self.hvd.broadcast_object(obj, root_rank=0, name=name) if self.hvd else obj


def _device(choice: str, comm: Comm):
    import torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible on this executor")
        torch.cuda.set_device(comm.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _optimizer(p: dict[str, Any], model):
    import torch

    from dl_pipeline.train.optim import MixedAdam

    if p["optimizer"] == "sgd":
        # torch's SGD takes sparse gradients as they are (no weight decay on them).
        return torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"])
    return MixedAdam(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])


def _evaluate_split(p: dict[str, Any], split: str, model, comm: Comm, device) -> tuple[dict, Any]:
    from dl_pipeline.train.data import eval_batches
    from dl_pipeline.train.loop import evaluate, summarize_eval

    url = f"{p['data_url']}/{split}"
    reader, batches = eval_batches(url, p["feature"], comm.rank, comm.size, max(256, p["batch_size"]), p["reader_workers"])
    with reader:
        sums = evaluate(model, batches, p["num_classes"], device)
    sums = {k: comm.allreduce_sum(v, f"eval.{split}.{k}") for k, v in sums.items()}
    return summarize_eval(sums), sums["confusion"]


def run_rank(p: dict[str, Any]) -> dict[str, Any] | None:
    """Train on this rank's shard; returns the final metrics on rank 0, None elsewhere."""
    import numpy as np
    import torch

    from dl_pipeline.errors import UserError
    from dl_pipeline.models import build_model
    from dl_pipeline.train import checkpoint as ckpt
    from dl_pipeline.train.data import train_batches
    from dl_pipeline.train.loop import NonFiniteLoss, lr_at, train_one_epoch

    comm = Comm(p["use_horovod"])
    is_root = comm.rank == 0
    if is_root:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s rank0: %(message)s", stream=sys.stderr)
    seed = p["seed"] + comm.rank
    torch.manual_seed(p["seed"])  # identical initial weights before the broadcast, too
    np.random.seed(seed)
    device = _device(p["device"], comm)
    torch.set_num_threads(max(1, p.get("threads_per_rank", 1)))

    model = build_model(p["model_spec"]).to(device)
    steps = p["steps_per_epoch"]
    peak_lr = p["lr"] * (comm.size if p["scale_lr"] else 1)
    warmup = int(p["warmup_epochs"] * steps)

    if p["mode"] == "hogwild":
        from dl_pipeline.train.hogwild import run_hogwild

        return run_hogwild(p, model, comm, device)

    optimizer = _optimizer(p, model)
    if comm.hvd:
        compression = comm.hvd.Compression.fp16 if p["fp16_allreduce"] else comm.hvd.Compression.none
        optimizer = comm.hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), compression=compression)

    state = {"epoch": 0, "global_step": 0, "best_val_loss": float("inf"), "bad_epochs": 0, "history": []}
    if p["resume"] and is_root:
        loaded = ckpt.load_latest(p["run_dir"], model, optimizer)
        if loaded:
            state.update(loaded)
            log.info("resumed from step %d (epoch %d)", state["global_step"], state["epoch"])
    state = comm.broadcast_object(state, "state")
    if comm.hvd:
        comm.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        comm.hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    reader, batches = train_batches(
        f"{p['data_url']}/train", p["feature"], comm.rank, comm.size, p["batch_size"], seed + 1000 * state["global_step"],
        p["reader_workers"], p["shuffle_buffer"],
    )
    metrics_log = ckpt.MetricsLog(p["run_dir"]) if is_root else None
    last = {"t": time.perf_counter(), "n": 0}

    def on_step(step: int, loss: float, lr: float, n: int) -> None:
        last["n"] += n * comm.size
        done = step + 1
        if is_root and (done % p["log_every_steps"] == 0 or done == total_steps):
            dt = time.perf_counter() - last["t"]
            rate = last["n"] / dt if dt > 0 else 0.0
            metrics_log.write({"type": "step", "step": done, "loss": loss, "lr": lr, "samples_per_s": rate})
            if p["progress"]:
                print(f"\rstep {done}/{total_steps} loss {loss:.4f} {rate:,.0f} samples/s", end="", file=sys.stderr, flush=True)
            last.update(t=time.perf_counter(), n=0)
        if is_root and p["checkpoint_every_steps"] and done % p["checkpoint_every_steps"] == 0 and done % steps:
            ckpt.save(p["run_dir"], model, optimizer, {**state, "global_step": done})
        if p.get("fail_at_step") and done == p["fail_at_step"]:
            os._exit(17)  # test hook: a crash mid-epoch, no clean-up, like a lost executor

    total_steps = p["epochs"] * steps
    stop = False
    with reader:
        while state["epoch"] < p["epochs"] and not stop:
            epoch = state["epoch"]
            in_epoch = state["global_step"] - epoch * steps  # >0 only right after a mid-epoch resume
            try:
                stats = train_one_epoch(
                    model, optimizer, batches, steps - in_epoch, state["global_step"],
                    lambda s: lr_at(s, p["lr"], peak_lr, warmup), device, on_step,
                )
            except NonFiniteLoss as exc:
                if not comm.hvd:
                    raise UserError(str(exc)) from None
                raise RuntimeError(str(exc)) from None
            state["global_step"] += steps - in_epoch
            val, _ = _evaluate_split(p, "val", model, comm, device)
            train_loss = float(comm.allreduce_sum(torch.tensor(stats["loss_sum"], dtype=torch.float64), f"tl{epoch}")) / max(
                1.0, float(comm.allreduce_sum(torch.tensor(float(stats["samples"]), dtype=torch.float64), f"ts{epoch}"))
            )
            improved = val["loss"] < state["best_val_loss"] - 1e-6
            state["best_val_loss"] = min(state["best_val_loss"], val["loss"])
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
            state["epoch"] = epoch + 1
            record = {
                "type": "epoch", "epoch": epoch + 1, "step": state["global_step"], "train_loss": train_loss,
                "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                "data_wait_fraction": stats["data_s"] / max(stats["step_s"], 1e-9),
                "samples_per_s": stats["samples"] * comm.size / max(stats["step_s"], 1e-9),
            }
            state["history"].append(record)
            if is_root:
                if p["progress"]:
                    print(file=sys.stderr)
                log.info("epoch %d: train_loss %.4f val_loss %.4f val_acc %.4f", epoch + 1, train_loss, val["loss"], val["accuracy"])
                metrics_log.write(record)
                ckpt.save(p["run_dir"], model, optimizer, state)
                if improved:
                    ckpt.save_best(p["run_dir"], model)
            if p["early_stopping_patience"] and state["bad_epochs"] >= p["early_stopping_patience"]:
                stop = True
                if is_root:
                    log.info("early stopping after epoch %d (val loss did not improve for %d epochs)", epoch + 1, state["bad_epochs"])

    return _finish(p, model, comm, device, state)


def _finish(p: dict[str, Any], model, comm: Comm, device, state: dict) -> dict[str, Any] | None:
    """Reload the best weights, evaluate val and test on all ranks, rank 0 writes the bundle."""
    from dl_pipeline.train import checkpoint as ckpt

    if comm.rank == 0:
        ckpt.load_best(p["run_dir"], model)
    if comm.hvd:
        comm.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    val, _ = _evaluate_split(p, "val", model, comm, device)
    test, confusion = _evaluate_split(p, "test", model, comm, device) if p["test_rows"] else ({"accuracy": None, "loss": None, "rows": 0}, None)
    if comm.rank != 0:
        return None
    metrics = {
        "val": val,
        "test": test,
        "epochs_run": state["epoch"],
        "global_step": state["global_step"],
        "world_size": comm.size,
        "mode": p["mode"],
        "history": state["history"],
    }
    ckpt.write_outputs(p, model.cpu(), metrics, None if confusion is None else confusion.tolist())
    return metrics


def main(argv: list[str] | None = None) -> int:
    """horovodrun entry: ``python -m dl_pipeline.train.worker PARAMS.json``."""
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as fh:
        params = json.load(fh)
    result = run_rank(params)
    if result is not None and len(argv) > 1:
        with open(argv[1], "w") as fh:
            json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
