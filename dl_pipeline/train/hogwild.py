"""HOGWILD! (Niu et al. 2011) inside a rank, with Horovod parameter averaging across ranks.

The rank process puts the model in shared memory and starts ``hogwild.workers`` processes;
each applies SGD updates to the shared parameters without locks while reading its own
sub-shard (shard ``rank * workers + w`` of ``size * workers``). Work goes in rounds of
``hogwild.sync_every`` steps: after each round the rank process averages the parameters with
the other ranks (one allreduce per tensor), then releases the next round.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("dl_pipeline.train")


def _worker(w: int, p: dict[str, Any], model, start, done, steps_this_round, stop, losses) -> None:
    import numpy as np
    import torch

    from dl_pipeline.train.data import train_batches
    from dl_pipeline.train.loop import train_one_epoch
    from dl_pipeline.train.worker import _optimizer

    torch.set_num_threads(1)
    rank, size, workers = p["_rank"], p["_size"], p["hogwild_workers"]
    seed = p["seed"] + rank * workers + w
    torch.manual_seed(seed)
    np.random.seed(seed)
    optimizer = _optimizer(p, model)
    peak = p["lr"]
    reader, batches = train_batches(
        f"{p['data_url']}/train", p["feature"], rank * workers + w, size * workers, p["batch_size"], seed,
        p["reader_workers"], p["shuffle_buffer"],
    )
    step = 0
    with reader:
        while True:
            start.wait()
            if stop.value:
                break
            n = steps_this_round.value
            stats = train_one_epoch(model, optimizer, batches, n, step, lambda s: peak, torch.device("cpu"))
            step += n
            losses[w] = stats["loss_sum"] / max(1, stats["samples"])
            done.wait()


def run_hogwild(p: dict[str, Any], model, comm, device) -> dict[str, Any] | None:
    import torch
    import torch.multiprocessing as mp

    from dl_pipeline.train import checkpoint as ckpt
    from dl_pipeline.train.worker import _evaluate_split, _finish

    if device.type != "cpu":
        raise RuntimeError("train.mode=hogwild runs on CPU (shared-memory SGD); set train.device=cpu")
    if comm.hvd:
        comm.hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    model.share_memory()
    workers = p["hogwild_workers"]
    ctx = mp.get_context("spawn")
    start, done = ctx.Barrier(workers + 1), ctx.Barrier(workers + 1)
    steps_this_round, stop = ctx.Value("i", 0), ctx.Value("b", 0)
    losses = ctx.Array("d", workers)
    args = {**p, "_rank": comm.rank, "_size": comm.size}
    procs = [ctx.Process(target=_worker, args=(w, args, model, start, done, steps_this_round, stop, losses), daemon=True) for w in range(workers)]
    for proc in procs:
        proc.start()
    # Per epoch each worker covers 1/workers of its rank's share of rows.
    per_worker = max(1, p["steps_per_epoch"] // workers)
    state = {"epoch": 0, "global_step": 0, "best_val_loss": float("inf"), "bad_epochs": 0, "history": []}
    metrics_log = ckpt.MetricsLog(p["run_dir"]) if comm.rank == 0 else None
    try:
        for epoch in range(p["epochs"]):
            left, round_losses, t_epoch = per_worker, [], time.perf_counter()
            while left > 0:
                n = min(p["hogwild_sync_every"], left)
                steps_this_round.value = n
                start.wait(timeout=600)
                done.wait(timeout=3600)
                left -= n
                round_losses.append(sum(losses[:]) / workers)
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        comm.average_(param.data, f"hogwild.{name}")
            state["global_step"] += per_worker
            train_s = time.perf_counter() - t_epoch
            val, _ = _evaluate_split(p, "val", model, comm, device)
            improved = val["loss"] < state["best_val_loss"] - 1e-6
            state["best_val_loss"] = min(state["best_val_loss"], val["loss"])
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
            state["epoch"] = epoch + 1
            record = {"type": "epoch", "epoch": epoch + 1, "step": state["global_step"],
                      "train_loss": sum(round_losses) / len(round_losses), "val_loss": val["loss"],
                      "val_accuracy": val["accuracy"],
                      "samples_per_s": per_worker * workers * p["batch_size"] * comm.size / max(train_s, 1e-9)}
            state["history"].append(record)
            if comm.rank == 0:
                log.info("hogwild epoch %d: val_loss %.4f val_acc %.4f", epoch + 1, val["loss"], val["accuracy"])
                print(f"hogwild epoch {epoch + 1}: val_acc {val['accuracy']:.4f}", file=sys.stderr)
                metrics_log.write(record)
                ckpt.save(p["run_dir"], model, None, state)
                if improved:
                    ckpt.save_best(p["run_dir"], model)
            if p["early_stopping_patience"] and state["bad_epochs"] >= p["early_stopping_patience"]:
                break
    finally:
        stop.value = 1
        try:
            start.wait(timeout=30)
        except Exception:  # workers already gone: nothing to release
            pass
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    return _finish(p, model, comm, device, state)
