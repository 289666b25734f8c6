"""Pure training-loop pieces (no I/O, no Horovod): one epoch of steps, and evaluation sums.

Shapes: batches are dicts of tensors with a leading batch dimension B; ``label`` is int64 [B].
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, Iterator

import torch
from torch.nn import functional as F


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float):
        super().__init__(f"loss became {value} at step {step}: lower train.lr or check the input features")
        self.step = step


def lr_at(step: int, *, base: float, peak: float, warmup: int, total: int, schedule: str) -> float:
    """The learning rate of global step ``step`` (0-based) of ``total``: a linear warm-up from
    ``base`` to ``peak`` over ``warmup`` steps (Goyal et al. 2017), then ``constant``, a
    ``linear`` decay towards 0 at the last step (fastText's own schedule) or a ``cosine`` one."""
    if step < warmup:
        return base + (peak - base) * step / warmup
    if schedule == "constant":
        return peak
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return peak * max(1.0 - frac, 1e-3)
    return peak * max(0.5 * (1.0 + math.cos(math.pi * frac)), 1e-3)


def schedule_of(spec) -> Callable[[int], float]:
    """A RankSpec's LR schedule as a function of the global step."""
    return functools.partial(lr_at, base=spec.base_lr, peak=spec.peak_lr, warmup=spec.warmup_steps,
                             total=spec.total_steps, schedule=spec.lr_schedule)


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    first_step: int,
    lr_for_step: Callable[[int], float],
    device: torch.device,
    on_step: Callable[[int, int, float, float, int], None] | None = None,
    step_stride: int = 1,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """Run exactly ``steps`` optimizer steps from ``batches``; returns loss and timing sums.

    ``first_step`` is the global step number of the first step (for LR schedule and logging);
    a Hogwild worker, one of ``step_stride`` sharing the steps, advances it by the stride.
    ``on_step(done, 1, loss, lr, rows)`` follows each step (``done``: global steps completed).
    ``data_s`` is time spent waiting for the next batch, ``step_s`` the whole step time.
    ``label_smoothing`` softens the targets of the loss trained on (and reported as train loss).
    """
    model.train()
    total_loss, samples, data_s, t_start = 0.0, 0, 0.0, time.perf_counter()
    for i in range(steps):
        step = first_step + i * step_stride
        t0 = time.perf_counter()
        batch = next(batches)
        data_s += time.perf_counter() - t0
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        for group in optimizer.param_groups:  # lr_scale: a pre-trained body's share (transfer.py)
            group["lr"] = lr_for_step(step) * group.get("lr_scale", 1.0)
        optimizer.zero_grad()  # set_to_none is the default; Horovod's wrapper takes no arguments
        loss = F.cross_entropy(model(batch), batch["label"].long(), label_smoothing=label_smoothing)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(step, value)
        loss.backward()
        optimizer.step()
        n = int(batch["label"].shape[0])
        total_loss += value * n
        samples += n
        if on_step is not None:
            on_step(step + 1, 1, value, optimizer.param_groups[0]["lr"], n)
    return {"loss_sum": total_loss, "samples": samples, "data_s": data_s, "step_s": time.perf_counter() - t_start}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, num_classes: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Sums over ``batches`` (to be allreduced): loss_sum, correct, rows, confusion [K, K]."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.float64)
    rows = torch.zeros((), dtype=torch.float64)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = batch["label"].long()
        logits = model(batch)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        pred = logits.argmax(dim=1)
        correct += float((pred == labels).sum())
        rows += labels.shape[0]
        idx = (labels * num_classes + pred).cpu()
        confusion += torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes).double()
    return {"loss_sum": loss_sum, "correct": correct, "rows": rows, "confusion": confusion}


def summarize_eval(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    rows = float(sums["rows"])
    return {
        "accuracy": float(sums["correct"]) / rows if rows else float("nan"),
        "loss": float(sums["loss_sum"]) / rows if rows else float("nan"),
        "rows": int(rows),
    }
