"""Driver-side training: validate the prepared dataset, build rank parameters, launch ranks.

Launchers (``train.launcher``):
  * ``spark``      ``horovod.spark.run`` runs one rank per Spark task (Gloo on CPU, NCCL on GPU);
  * ``horovodrun`` ``horovodrun --gloo -np N -H ...`` on plain hosts;
  * ``local``      one in-process rank, no Horovod (debugging).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from typing import Any

from dl_pipeline import dataset, fsutil
from dl_pipeline.config import Config
from dl_pipeline.errors import PipelineError, UserError
from dl_pipeline.models import FEATURE_OF, model_spec

log = logging.getLogger(__name__)


def _world_size(cfg: Config, spark) -> int:
    if cfg.train.launcher == "local":
        return 1
    if cfg.train.num_proc:
        return cfg.train.num_proc
    if spark is not None:
        return max(1, spark.sparkContext.defaultParallelism)
    return max(1, os.cpu_count() or 1)


def build_params(cfg: Config, world_size: int) -> dict[str, Any]:
    """Everything a rank needs, as plain JSON-able values (no config objects, no Spark)."""
    t = cfg.train
    if not t.data_path:
        raise UserError("train.data_path is not set: point it at prepare.output_path")
    if not t.run_dir:
        raise UserError("train.run_dir is not set: pass --set train.run_dir=DIR")
    manifest = dataset.read_manifest(t.data_path)
    feature = FEATURE_OF[cfg.model.name]
    if feature not in manifest["schema"]:
        have = ", ".join(k for k in manifest["schema"] if k not in ("row_id", "label"))
        raise UserError(
            f"{t.data_path}: prepared dataset has no '{feature}' feature (has: {have}); model.name={cfg.model.name} "
            f"needs it: re-run prepare with the matching features, or pick a model that uses {have}"
        )
    splits = manifest["splits"]
    groups = min(splits["train"]["row_groups"], splits["val"]["row_groups"] or 10**9)
    if world_size > groups:
        raise UserError(
            f"world size {world_size} > {groups} row groups in {t.data_path}: lower train.num_proc or re-run prepare "
            f"with shard.max_workers >= {world_size}"
        )
    if splits["val"]["rows"] == 0:
        raise UserError(f"{t.data_path}: the val split is empty; re-run prepare with shard.val_fraction > 0")
    steps = t.steps_per_epoch or max(1, splits["train"]["rows"] // (world_size * t.batch_size))
    spec = model_spec(cfg.model.name, manifest["featurizer"], manifest["num_classes"], cfg.model.embed_dim,
                      cfg.model.char_cnn_size, cfg.model.dropout, cfg.model.sparse_embeddings)
    return {
        "data_url": fsutil.to_url(t.data_path).rstrip("/"),
        "run_dir": fsutil.local_path(t.run_dir) or t.run_dir,
        "model_spec": spec,
        "feature": feature,
        "num_classes": manifest["num_classes"],
        "label_base": manifest["label_base"],
        "label_names": manifest["label_names"],
        "featurizer": manifest["featurizer"],
        "test_rows": splits["test"]["rows"],
        "steps_per_epoch": steps,
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "optimizer": t.optimizer,
        "lr": t.lr,
        "momentum": t.momentum,
        "weight_decay": t.weight_decay,
        "scale_lr": t.scale_lr,
        "warmup_epochs": t.warmup_epochs,
        "seed": t.seed,
        "early_stopping_patience": t.early_stopping_patience,
        "checkpoint_every_steps": t.checkpoint_every_steps,
        "reader_workers": t.reader_workers,
        "shuffle_buffer": t.shuffle_buffer,
        "device": t.device,
        "resume": t.resume,
        "log_every_steps": t.log_every_steps,
        "progress": t.progress and sys.stderr.isatty(),
        "mode": t.mode,
        "hogwild_workers": cfg.hogwild.workers,
        "hogwild_sync_every": cfg.hogwild.sync_every,
        "use_horovod": t.launcher != "local",
        "fp16_allreduce": cfg.horovod.fp16_allreduce,
        "threads_per_rank": max(1, (os.cpu_count() or 1) // max(1, world_size if t.launcher != "local" else 1)),
        "world_size": world_size,
        "mlflow_tracking_uri": t.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""),
        "mlflow_experiment": t.mlflow_experiment,
        "config": cfg.to_dict(),
        # Test hook: the rank process dies (os._exit) after this global step, like a lost node.
        "fail_at_step": int(os.environ.get("DL_PIPELINE_FAIL_AT_STEP", "0")),
    }


def _launch_spark(params: dict[str, Any], cfg: Config, n: int, spark) -> dict[str, Any]:
    import horovod.spark

    from dl_pipeline.train.worker import run_rank

    master = spark.sparkContext.master
    nics = set(cfg.horovod.nics) or ({"lo"} if master.startswith("local") else None)
    results = horovod.spark.run(
        run_rank, args=(params,), num_proc=n, start_timeout=cfg.horovod.start_timeout_s, use_gloo=True,
        verbose=cfg.horovod.verbose, nics=nics, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return next(r for r in results if r is not None)


def _launch_horovodrun(params: dict[str, Any], cfg: Config, n: int) -> dict[str, Any]:
    hosts = cfg.horovod.hosts or f"localhost:{n}"
    with tempfile.TemporaryDirectory(prefix="dl-train-") as tmp:
        pfile, rfile = os.path.join(tmp, "params.json"), os.path.join(tmp, "result.json")
        with open(pfile, "w") as fh:
            json.dump(params, fh)
        horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
        cmd = [horovodrun, "--gloo", "-np", str(n), "-H", hosts, "--start-timeout", str(cfg.horovod.start_timeout_s)]
        if cfg.horovod.nics:
            cmd += ["--network-interface", ",".join(cfg.horovod.nics)]
        elif hosts.startswith("localhost"):
            cmd += ["--network-interface", "lo"]
        cmd += [sys.executable, "-m", "dl_pipeline.train.worker", pfile, rfile]
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise RuntimeError(f"horovodrun exited with status {proc.returncode}")
        with open(rfile) as fh:
            return json.load(fh)


def train_model(cfg: Config, spark=None) -> dict[str, Any]:
    """Train per ``cfg``; returns final metrics (also in ``<run_dir>/metrics.json``)."""
    from dl_pipeline.spark import get_spark

    if cfg.train.launcher == "spark" and spark is None:
        spark = get_spark(cfg.spark)
    n = _world_size(cfg, spark)
    params = build_params(cfg, n)
    os.makedirs(params["run_dir"], exist_ok=True)
    with open(os.path.join(params["run_dir"], "config.json"), "w") as fh:
        fh.write(cfg.to_json())
    if not cfg.train.resume and os.path.exists(os.path.join(params["run_dir"], "metrics.jsonl")):
        os.remove(os.path.join(params["run_dir"], "metrics.jsonl"))
    log.info("training %s (%s mode) on %d rank(s) via %s, %d steps/epoch", cfg.model.name, cfg.train.mode, n,
             cfg.train.launcher, params["steps_per_epoch"])
    if cfg.train.launcher == "local":
        from dl_pipeline.train.worker import run_rank

        metrics = run_rank(params)
    else:
        launch = _launch_spark if cfg.train.launcher == "spark" else _launch_horovodrun
        try:
            metrics = launch(params, cfg, n, spark) if launch is _launch_spark else launch(params, cfg, n)
        except Exception as exc:  # a rank failed: its own traceback is in the log above
            raise PipelineError(f"training failed on a Horovod rank ({str(exc).splitlines()[0][:300]}); see the rank log above") from exc
    summary = {"val": metrics["val"], "test": metrics["test"], "epochs_run": metrics["epochs_run"],
               "world_size": metrics["world_size"], "run_dir": params["run_dir"]}
    log.info("train finished: %s", json.dumps(summary))
    return {**metrics, "summary": summary}
