"""One training recipe per model: what ``train.*`` keys left at "auto" resolve to.

A recipe is chosen for throughput as well as accuracy (figures in bench/README.md). fastText
trains with the sparse-aware Adam (optim.MixedAdam: lazy updates of the embedding rows a batch
used) at batch 256, a short warm-up and a linear decay of the LR to 0 over the run (fastText's
own schedule). Measured on the AG News sample (1 rank, 10 epochs): plain sparse SGD, fastText's
own optimizer, steps ~2.5x faster (ceiling 144k vs 48-70k samples/s) but tops out at fastText's
accuracy (84.4%, best of 15 LR settings); row-wise Adagrad on the embedding (one state per row)
reached 84.9-85.4%; Adam reaches 85.7%. Batch 256 vs 64 halves the steps' fixed costs (Horovod's
allgather, the Python loop) at the same accuracy. The LSTM (model.name: lstm) trains with the same
sparse-aware Adam at batch 64 and a linear decay; its step is bound by per-timestep overhead on
CPU, not by the data. The CNNs keep Adam at a constant LR after warm-up.

fastText on small data (measured on dev folds carved from the training rows of AG News, Amazon
Polarity, DBpedia, Yelp Full and Yelp Polarity, 3 folds each, against fastText on the same folds;
bench/README.md): the batch shrinks so an epoch has enough steps, and the LR shrinks with it
(``lr_follows_batch``: the same LR per sample; at the recipe's LR and batch 32 AG News and Amazon
memorized their training rows in one epoch: -0.2 and +0.6 pt against fastText, +0.9 and +0.8 with
the LR scaled), label smoothing 0.1 (+0.3 pt more on both), and as many epochs as it takes to reach
``min_steps`` steps (DBpedia and Yelp Polarity underfit at the smaller LR in 10 epochs: +0.7 and
+0.0 pt, +3.0 and +12.8 with enough steps), ended by early stopping that waits at least
``patience_steps`` (a 7-row val split stops a 6-step epoch run before it learns anything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    optimizer: str
    lr: float  # per rank at ``batch_size``; x world size when train.scale_lr
    batch_size: int  # per rank, the most: smaller on small data (see ``batch_for``)
    lr_schedule: str
    momentum: float
    warmup_epochs: float
    epochs: int  # the least; more on small data (``min_steps``); early stopping ends sooner
    min_steps_per_epoch: int = 128
    lr_follows_batch: bool = False  # a smaller batch than ``batch_size`` gets a proportionally smaller LR
    min_steps: int = 0  # epochs grow (up to ``max_epochs``) until the run has this many steps
    max_epochs: int = 0
    label_smoothing: float = 0.0
    patience: int = 3  # early stopping: epochs without a better val loss ...
    patience_steps: int = 0  # ... and at least this many steps
    steps_per_epoch: int = 0  # resolved: what one epoch runs


RECIPES = {
    "fasttext": Recipe(optimizer="adam", lr=0.02, batch_size=256, lr_schedule="linear", momentum=0.9, warmup_epochs=0.1,
                       epochs=10, lr_follows_batch=True, min_steps=3000, max_epochs=300, label_smoothing=0.1,
                       patience_steps=500),
    "lstm": Recipe(optimizer="adam", lr=0.003, batch_size=64, lr_schedule="linear", momentum=0.9, warmup_epochs=0.1,
                   epochs=10),
    "char_cnn": Recipe(optimizer="adam", lr=0.001, batch_size=64, lr_schedule="constant", momentum=0.9, warmup_epochs=0.5,
                       epochs=10),
    "cnn": Recipe(optimizer="adam", lr=0.001, batch_size=64, lr_schedule="constant", momentum=0.9, warmup_epochs=0.5,
                  epochs=15),
}

# The smallest per-rank batch the data-size rule picks: below it a step is all Python overhead.
MIN_BATCH = 16

# The LR when train.optimizer names another optimizer than the recipe's and train.lr is unset.
DEFAULT_LR = {"sgd": 0.1, "adam": 0.001}


def batch_for(most: int, rows_per_rank: int, min_steps: int) -> int:
    """The per-rank batch: ``most``, halved until an epoch has at least ``min_steps`` steps
    (never below MIN_BATCH). Why: at batch 256 a 200-row dataset trains one step per epoch and
    ends at chance level; fastText itself updates after every row. Measured on the val splits
    only (2 ranks, up to 10 epochs), min_steps 32 -> 128: val loss AG News 0.365 -> 0.353 (batch
    32), DBpedia 0.090 -> 0.077, Amazon accuracy 86.2% -> 88.8%; at batch 256 Yelp polarity's 193
    rows sat at 57% val (chance), at 16 86%."""
    batch = most
    while batch > MIN_BATCH and rows_per_rank // batch < min_steps:
        batch //= 2
    return batch


def epochs_for(least: int, most: int, steps_per_epoch: int, min_steps: int) -> int:
    """``least`` epochs, or more (up to ``most``) until the run has ``min_steps`` steps."""
    if not min_steps:
        return least
    return max(least, min(most, math.ceil(min_steps / steps_per_epoch)))


def resolve(model: str, train, rows_per_rank: int) -> Recipe:
    """The recipe for ``model`` with every key the user set in ``train`` (a TrainConfig) applied;
    ``rows_per_rank`` (the train split over the ranks) sizes the batch, and the epochs, when they
    are left at auto. The result's ``steps_per_epoch`` is what one epoch runs."""
    r = RECIPES[model]
    optimizer = r.optimizer if train.optimizer == "auto" else train.optimizer
    batch = train.batch_size or batch_for(r.batch_size, rows_per_rank, r.min_steps_per_epoch)
    if train.lr:
        lr = train.lr
    elif optimizer != r.optimizer:
        lr = DEFAULT_LR[optimizer]
    else:
        # only the batch this rule picked: a batch the user set keeps the recipe's LR (override just that part)
        lr = r.lr * (batch / r.batch_size if r.lr_follows_batch and not train.batch_size else 1.0)
    steps = train.steps_per_epoch or max(1, rows_per_rank // batch)
    patience = train.early_stopping_patience
    if patience < 0:
        patience = max(r.patience, math.ceil(r.patience_steps / steps))
    return Recipe(
        optimizer=optimizer,
        lr=lr,
        batch_size=batch,
        lr_schedule=r.lr_schedule if train.lr_schedule == "auto" else train.lr_schedule,
        momentum=r.momentum if train.momentum < 0 else train.momentum,
        warmup_epochs=r.warmup_epochs if train.warmup_epochs < 0 else train.warmup_epochs,
        epochs=train.epochs or epochs_for(r.epochs, r.max_epochs, steps, r.min_steps),
        min_steps_per_epoch=r.min_steps_per_epoch,
        lr_follows_batch=r.lr_follows_batch,
        label_smoothing=r.label_smoothing if train.label_smoothing < 0 else train.label_smoothing,
        patience=patience,
        steps_per_epoch=steps,
    )
