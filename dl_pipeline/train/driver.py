"""Driver-side training: validate the prepared dataset, build the RankSpec once, launch ranks.

The launchers are in ``launch.py``, the rank code in ``epochs.py``; nothing here imports torch
or horovod at module level.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from dl_pipeline import dataset, fsutil
from dl_pipeline.config import Config
from dl_pipeline.errors import PipelineError, UserError
from dl_pipeline.models import FEATURE_OF, model_spec
from dl_pipeline.train import recipes, transfer
from dl_pipeline.train.spec import RankSpec, columns_of

log = logging.getLogger(__name__)


COMM_OF = {"local": "none", "spark": "horovod", "horovodrun": "horovod", "torch_distributor": "torch"}


def reader_for(choice: str) -> str:
    """``train.reader`` resolved here, on the driver (data.resolve_reader), so every rank reads
    the same way; ``petastorm`` where it is missing is one line."""
    from dl_pipeline.train.data import resolve_reader

    reader = resolve_reader(choice)
    if reader == "petastorm" and resolve_reader("auto") != "petastorm":
        raise UserError("train.reader=petastorm but petastorm is not installed here; set train.reader=arrow (or auto)")
    return reader


def check_launcher(launcher: str) -> None:
    """A launcher whose library is missing on this stack: one line naming the one that works."""
    import importlib.util

    if COMM_OF[launcher] == "horovod" and importlib.util.find_spec("horovod") is None:
        raise UserError(f"train.launcher={launcher} needs Horovod, which is not installed here (Spark 4 / Databricks 16.4+ "
                        "runtimes have none); set train.launcher=torch_distributor")


def _world_size(cfg: Config, spark) -> int:
    if cfg.train.launcher == "local":
        return 1
    if cfg.train.num_proc:
        return cfg.train.num_proc
    if cfg.train.launcher == "horovodrun" and cfg.horovod.hosts:  # the hosts' slots, not this machine's cores
        return sum(int(h.rsplit(":", 1)[1]) if ":" in h else 1 for h in cfg.horovod.hosts.split(","))
    if spark is not None:
        return max(1, spark.sparkContext.defaultParallelism)
    return max(1, os.cpu_count() or 1)


def _check_layout(cfg: Config, splits: dict[str, Any], world_size: int) -> None:
    """Every reader must own at least one row group of every split it reads: fail now, not
    after hours of training (a reader with no row group raises or waits)."""
    t = cfg.train
    readers = world_size * (cfg.hogwild.workers if t.mode == "hogwild" else 1)
    what = f"{world_size} rank(s) x {cfg.hogwild.workers} Hogwild workers" if t.mode == "hogwild" else f"world size {world_size}"
    if readers > splits["train"]["row_groups"]:
        raise UserError(f"{what} > {splits['train']['row_groups']} row groups in {t.data_path}: lower train.num_proc"
                        f"{' or hogwild.workers' if t.mode == 'hogwild' else ''} or re-run prepare with shard.max_workers >= {readers}")
    for split in ("val", "test"):
        groups = splits[split]["row_groups"]
        if splits[split]["rows"] and world_size > groups:
            raise UserError(f"world size {world_size} > {groups} row groups in the {split} split of {t.data_path}: lower "
                            f"train.num_proc or re-run prepare with shard.max_workers >= {world_size}")


def shard_mib(manifest: dict[str, Any], columns: tuple[str, ...], readers: int, splits: tuple[str, ...]) -> float:
    """The decoded size of the largest shard of ``splits`` one of ``readers`` holds, MiB: its rows
    (Petastorm deals row groups out round-robin) x the columns' bytes per row, padding counted
    (an upper bound: token rows are held without it)."""
    row_bytes = sum(dataset.column_bytes(manifest["schema"][c]) for c in columns)
    total = 0
    for split in splits:
        groups = manifest["splits"][split].get("rows_per_row_group") or [manifest["splits"][split]["rows"]]
        total += max(sum(groups[r::readers]) for r in range(min(readers, len(groups))))
    return total * row_bytes / 2**20


def rank_spec(cfg: Config, world_size: int) -> RankSpec:
    """Everything a rank needs, typed, from the config and the prepared dataset's manifest."""
    t = cfg.train
    if not t.data_path:
        raise UserError("train.data_path is not set: point it at prepare.output_path")
    if not t.run_dir:
        raise UserError("train.run_dir is not set: pass --set train.run_dir=DIR")
    if fsutil.local_path(t.run_dir) is None:
        # checkpoints, metrics, plots and the bundle are written by rank 0 with local file calls
        raise UserError(f"train.run_dir={t.run_dir}: must be a local or mounted path that rank 0 and the driver share "
                        "(e.g. /dbfs/... on Databricks, an NFS mount), not a Hadoop URI")
    manifest = dataset.read_manifest(t.data_path)
    feature = FEATURE_OF[cfg.model.name]
    if feature not in manifest["schema"]:
        have = ", ".join(k for k in manifest["schema"] if k not in ("row_id", "label", "length"))
        raise UserError(
            f"{t.data_path}: prepared dataset has no '{feature}' feature (has: {have}); model.name={cfg.model.name} "
            f"needs it: re-run prepare with the matching features, or pick a model that uses {have}"
        )
    missing = [c for c in columns_of(cfg.model.name) if c not in manifest["schema"]]
    if missing:
        raise UserError(f"{t.data_path}: prepared dataset has no {', '.join(missing)} column (model.name={cfg.model.name} "
                        f"reads it; datasets prepared by an earlier version lack it): re-run `dl-pipeline prepare`")
    if t.mlflow_registered_model and not (t.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise UserError(f"train.mlflow_registered_model={t.mlflow_registered_model!r} needs a tracking server: set "
                        "train.mlflow_tracking_uri (or MLFLOW_TRACKING_URI)")
    splits = manifest["splits"]
    if splits["val"]["rows"] == 0:
        raise UserError(f"{t.data_path}: the val split is empty; re-run prepare with shard.val_fraction > 0")
    _check_layout(cfg, splits, world_size)
    r = recipes.resolve(cfg.model.name, t, splits["train"]["rows"] // world_size)
    steps = r.steps_per_epoch
    m = cfg.model
    spec = model_spec(m.name, manifest["featurizer"], manifest["num_classes"], m.embed_dim, m.char_cnn_size, m.dropout,
                      m.sparse_embeddings, m.lstm_hidden, m.lstm_layers, m.lstm_bidirectional)
    warm: dict[str, Any] = {}
    if t.init_from:  # the architecture is the bundle's; the head fits this dataset's classes
        spec, warm = transfer.plan(t, cfg.model.name, manifest)
    peak = r.lr * (world_size if t.scale_lr else 1)
    readers = world_size * (cfg.hogwild.workers if t.mode == "hogwild" else 1)
    return RankSpec(
        data_url=dataset.data_root(t.data_path, manifest),  # resolved once: a later publish does not move this run
        run_dir=fsutil.local_path(t.run_dir),
        feature=feature,
        shapes={k: v["shape"] for k, v in manifest["schema"].items()},
        steps_per_epoch=steps,
        test_rows=splits["test"]["rows"],
        model_spec=spec,
        featurizer=manifest["featurizer"],
        num_classes=manifest["num_classes"],
        label_base=manifest["label_base"],
        label_names=tuple(manifest["label_names"]),
        epochs=r.epochs,
        batch_size=r.batch_size,
        optimizer=r.optimizer,
        # Warm-up starts from the single-rank LR (Goyal et al. 2017); no warm-up: at peak at once.
        base_lr=r.lr if r.warmup_epochs > 0 else peak,
        peak_lr=peak,
        lr_schedule=r.lr_schedule,
        warmup_steps=int(r.warmup_epochs * steps),
        momentum=r.momentum,
        weight_decay=t.weight_decay,
        seed=t.seed,
        early_stopping_patience=r.patience,
        label_smoothing=r.label_smoothing,
        checkpoint_every_steps=t.checkpoint_every_steps,
        log_every_steps=t.log_every_steps,
        progress=t.progress,
        resume=t.resume,
        reader_workers=t.reader_workers,
        # A pool larger than the reader's whole shard would only hold rows of the next pass.
        shuffle_buffer=min(t.shuffle_buffer, max(r.batch_size, -(-splits["train"]["rows"] // readers))),
        resident=shard_mib(manifest, columns_of(cfg.model.name), readers, ("train", "val")) <= t.cache_mb,
        device=t.device,
        mode=t.mode,
        hogwild_workers=cfg.hogwild.workers,
        hogwild_sync_every=cfg.hogwild.sync_every,
        comm=COMM_OF[t.launcher],
        reader=reader_for(t.reader),
        fp16_allreduce=cfg.horovod.fp16_allreduce,
        world_size=world_size,
        mlflow_tracking_uri=t.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""),
        mlflow_experiment=t.mlflow_experiment,
        mlflow_registered_model=t.mlflow_registered_model,
        config=cfg.to_dict(),
        transfer=warm,
        fail_at_step=int(os.environ.get("DL_PIPELINE_FAIL_AT_STEP", "0")),
    )


def _launch_with_restarts(spec: RankSpec, cfg: Config, n: int, spark) -> dict[str, Any]:
    """Launch the ranks; after a rank failure relaunch them all from the last checkpoint, up to
    ``train.max_restarts`` times (torchrun's --max-restarts), then fail with one line naming
    what died and where ``--resume`` would continue."""
    import dataclasses

    from dl_pipeline.train import checkpoint
    from dl_pipeline.train.launch import LAUNCHERS

    launch = LAUNCHERS[cfg.train.launcher]
    for attempt in range(cfg.train.max_restarts + 1):
        try:
            return launch(spec, cfg, n, spark)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - a rank's own traceback is in the log above
            if cfg.train.launcher == "local":  # the rank ran in this process: its traceback goes to the log
                log.error("the rank failed", exc_info=True)
            what = " ".join(str(exc).split())[:300] or type(exc).__name__
            where = checkpoint.describe(spec.run_dir)
            if attempt == cfg.train.max_restarts:
                hint = "; continue with --resume" if "step" in where else ""
                raise PipelineError(f"training failed ({what}); {where}{hint}") from exc
            log.warning("training failed (%s); restart %d of %d from the %s", what, attempt + 1, cfg.train.max_restarts, where)
            # the relaunched ranks resume; the test hook that killed a rank fires once
            spec = dataclasses.replace(spec, resume=True, fail_at_step=0)
    raise AssertionError("unreachable")


def train_model(cfg: Config, spark=None) -> dict[str, Any]:
    """Train per ``cfg``; returns final metrics (also in ``<run_dir>/metrics.json``)."""
    from dl_pipeline.spark import get_spark
    from dl_pipeline.train import checkpoint

    check_launcher(cfg.train.launcher)
    if cfg.train.launcher in ("spark", "torch_distributor") and spark is None:
        spark = get_spark(cfg.spark)
    n = _world_size(cfg, spark)
    spec = rank_spec(cfg, n)
    if spec.resume:
        # a checkpoint that is not ours, or of another plan, stops here, before any rank loads it
        checkpoint.check(spec.run_dir, checkpoint.plan_of(spec))
    os.makedirs(spec.run_dir, exist_ok=True)
    with open(os.path.join(spec.run_dir, "config.json"), "w") as fh:
        fh.write(cfg.to_json())
    if not spec.resume and os.path.exists(os.path.join(spec.run_dir, "metrics.jsonl")):
        os.remove(os.path.join(spec.run_dir, "metrics.jsonl"))
    log.info("training %s (%s mode) on %d rank(s) via %s: %s, global batch %d, peak lr %g (%s schedule, %d warm-up steps), "
             "%d steps/epoch x at most %d epochs (%s), label smoothing %g; shards %s", cfg.model.name, spec.mode, n, cfg.train.launcher, spec.optimizer,
             spec.batch_size * n * (spec.hogwild_workers if spec.mode == "hogwild" else 1), spec.peak_lr, spec.lr_schedule,
             spec.warmup_steps, spec.steps_per_epoch, spec.epochs,
             f"early stopping after {spec.early_stopping_patience} epochs without a better val loss"
             if spec.early_stopping_patience else "no early stopping", spec.label_smoothing,
             "held in memory after one read" if spec.resident else f"streamed from Parquet every pass (train.cache_mb={cfg.train.cache_mb})")
    metrics = _launch_with_restarts(spec, cfg, n, spark)
    summary = {"val": metrics["val"], "test": metrics["test"], "epochs_run": metrics["epochs_run"],
               "world_size": metrics["world_size"], "run_dir": spec.run_dir}
    log.info("train finished: %s", json.dumps(summary))
    return {**metrics, "summary": summary}
