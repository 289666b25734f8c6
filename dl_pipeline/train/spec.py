"""RankSpec: everything a rank needs, typed, built once by the driver (``driver.rank_spec``).

It holds plain values only (str, int, float, bool, tuples and JSON-able dicts), so it pickles
for ``horovod.spark.run``, round-trips through JSON for ``horovodrun`` and is passed as is to
the in-process launcher. What depends on the rank's own machine (threads, device index, whether
stderr is a terminal) is decided on the rank, not here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


def columns_of(model: str) -> tuple[str, ...]:
    """The columns a training batch reads: the label, the model's feature and what delimits it."""
    from dl_pipeline.models import INPUTS

    return ("label", *INPUTS[model])


@dataclass(frozen=True)
class RankSpec:
    # data: a prepared dataset (dataset.py) and the feature the model reads
    data_url: str
    run_dir: str
    feature: str
    shapes: dict[str, list[int]]  # column -> shape of one row (manifest "schema")
    steps_per_epoch: int
    test_rows: int
    # model and the labels it predicts
    model_spec: dict[str, Any]
    featurizer: dict[str, Any]
    num_classes: int
    label_base: int
    label_names: tuple[str, ...]
    # optimization: batch_size is per rank; peak_lr is the LR after world-size scaling
    epochs: int
    batch_size: int
    optimizer: str
    base_lr: float
    peak_lr: float
    lr_schedule: str
    warmup_steps: int
    momentum: float
    weight_decay: float
    seed: int
    early_stopping_patience: int
    label_smoothing: float = 0.0  # of the training loss only; val and test losses are plain cross-entropy
    # loop bookkeeping
    checkpoint_every_steps: int = 0
    log_every_steps: int = 50
    progress: bool = True  # wanted by the user; shown only where the rank's stderr is a TTY
    resume: bool = False
    # reading: petastorm (make_batch_reader) | arrow (pyarrow alone, for stacks without Petastorm)
    reader: str = "petastorm"
    reader_workers: int = 1
    shuffle_buffer: int = 16384
    resident: bool = False  # each reader holds its train and val shards in memory (data.ResidentShard)
    # placement and communication
    device: str = "auto"
    mode: str = "sync"
    hogwild_workers: int = 2
    hogwild_sync_every: int = 50
    comm: str = "none"  # none (one process) | horovod | torch (torch.distributed): comm.open_comm
    fp16_allreduce: bool = False
    world_size: int = 1
    # outputs
    mlflow_tracking_uri: str = ""
    mlflow_experiment: str = "dl_pipeline"
    mlflow_registered_model: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    # warm start (train/transfer.py plan): bundle, model_version, head kept/new, freeze, body_lr_factor
    transfer: dict[str, Any] = field(default_factory=dict)
    # test hook: the rank process dies (os._exit(17)) after this global step, like a lost node
    fail_at_step: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.feature in self.shapes, f"feature {self.feature!r} is not in the dataset's columns {sorted(self.shapes)}"),
            (self.steps_per_epoch >= 1, "steps_per_epoch must be >= 1"),
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1"),
            (self.optimizer in ("sgd", "adam"), f"optimizer {self.optimizer!r}: sgd or adam"),
            (self.lr_schedule in ("constant", "linear", "cosine"), f"lr_schedule {self.lr_schedule!r}"),
            (self.peak_lr > 0 and self.base_lr > 0, "learning rates must be > 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.warmup_steps >= 0 and self.log_every_steps >= 1, "warmup_steps >= 0 and log_every_steps >= 1"),
            (self.mode in ("sync", "hogwild"), f"mode {self.mode!r}: sync or hogwild"),
            (self.comm in ("none", "horovod", "torch"), f"comm {self.comm!r}: none, horovod or torch"),
            (self.reader in ("petastorm", "arrow"), f"reader {self.reader!r}: petastorm or arrow"),
            (self.hogwild_workers >= 1 and self.hogwild_sync_every >= 1, "hogwild workers and sync_every must be >= 1"),
            (self.world_size >= 1 and self.reader_workers >= 1, "world_size and reader_workers must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"RankSpec: {msg}")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def columns(self) -> tuple[str, ...]:
        return columns_of(self.model_spec["name"])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RankSpec:
        doc = json.loads(text)
        doc["label_names"] = tuple(doc["label_names"])
        return cls(**doc)
