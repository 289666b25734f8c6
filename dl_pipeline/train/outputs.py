"""Rank-0 run outputs: the metrics log, metrics.json, plots, the model bundle and MLflow.

``<run_dir>/``::

    metrics.jsonl           one JSON line per logged step / epoch
    metrics.json            final {val, test: {accuracy, loss, rows}, history, ...}
    learning_curve.png, confusion_matrix.png
    model/                  the bundle (dl_pipeline.bundle)
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def _dir(run_dir: str, *parts: str) -> str:
    path = os.path.join(run_dir, *parts)
    os.makedirs(os.path.dirname(path) if parts else path, exist_ok=True)
    return path


class MetricsLog:
    def __init__(self, run_dir: str):
        self.path = _dir(run_dir, "metrics.jsonl")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _plots(run_dir: str, history: list[dict], confusion: list[list[float]] | None, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if history:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        ep = [h["epoch"] for h in history]
        ax[0].plot(ep, [h["train_loss"] for h in history], label="train")
        ax[0].plot(ep, [h["val_loss"] for h in history], label="val")
        ax[0].set(xlabel="epoch", ylabel="loss", title="loss")
        ax[0].legend()
        ax[1].plot(ep, [h["val_accuracy"] for h in history])
        ax[1].set(xlabel="epoch", ylabel="accuracy", title="val accuracy")
        fig.tight_layout()
        fig.savefig(os.path.join(run_dir, "learning_curve.png"), dpi=80)
        plt.close(fig)
    if confusion is not None:
        cm = np.asarray(confusion)
        fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(cm), 1 + 0.5 * len(cm)))
        ax.imshow(cm / np.maximum(cm.sum(1, keepdims=True), 1), cmap="Blues")
        ax.set(xticks=range(len(cm)), yticks=range(len(cm)), xlabel="predicted", ylabel="true", title="test confusion")
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_yticklabels(names, fontsize=7)
        for i in range(len(cm)):
            for j in range(len(cm)):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(run_dir, "confusion_matrix.png"), dpi=80)
        plt.close(fig)


def write_outputs(spec, model, metrics: dict, confusion: list[list[float]] | None) -> None:
    """metrics.json, plots, the model bundle and MLflow, for a RankSpec's run; rank 0 only."""
    from dl_pipeline.bundle import save_bundle

    run_dir = spec.run_dir
    out = {**metrics, "test_confusion": confusion}
    tmp = _dir(run_dir, "metrics.json") + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=2)
    os.replace(tmp, os.path.join(run_dir, "metrics.json"))
    _plots(run_dir, metrics["history"], confusion, list(spec.label_names))
    labels = {"label_base": spec.label_base, "names": list(spec.label_names)}
    final = {"val": metrics["val"], "test": metrics["test"], **({"init_from": spec.transfer} if spec.transfer else {})}
    save_bundle(os.path.join(run_dir, "model"), model, spec.model_spec, spec.featurizer, labels, final)
    log_to_mlflow(spec, metrics)


def _flat(prefix: str, doc: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(key, v))
        elif not isinstance(v, (list, tuple)):
            out[key] = v
    return out


def _scalars(record: dict, skip=()) -> dict:
    """The numeric entries of one metrics record as MLflow metrics; lists (per-rank figures such as
    data_wait_fraction_per_rank) become one metric per rank, `<key>_rank<i>`."""
    out = {}
    for k, v in record.items():
        if k in skip or v is None:
            continue
        if isinstance(v, (list, tuple)):
            out.update({f"{k}_rank{i}": float(x) for i, x in enumerate(v)})
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


RESOLVED_PARAMS = ("epochs", "batch_size", "optimizer", "peak_lr", "lr_schedule", "warmup_steps", "label_smoothing",
                   "early_stopping_patience", "steps_per_epoch", "world_size")


def log_to_mlflow(spec, metrics: dict) -> str | None:
    """Log params, per-epoch and final metrics and the bundle, as a pyfunc model defined from code
    (``mlflow_io.log_bundle_model``; registered as ``train.mlflow_registered_model`` when set), to
    MLflow; a no-op unless a tracking URI is configured (train.mlflow_tracking_uri or
    MLFLOW_TRACKING_URI). Writes ``<run_dir>/mlflow.json`` (run id, model URI, registered
    version) and returns the run id. Training never fails because of tracking: problems are
    logged as warnings, and the bundle is on disk either way."""
    import logging

    log = logging.getLogger("dl_pipeline.train")
    uri = spec.mlflow_tracking_uri
    if not uri:
        return None
    try:
        import mlflow

        from dl_pipeline.mlflow_io import log_bundle_model
    except ImportError:
        log.warning("MLflow tracking URI %s is set but mlflow is not installed; skipping MLflow logging", uri)
        return None
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(spec.mlflow_experiment)
        with mlflow.start_run() as run:
            params = _flat("", {k: spec.config[k] for k in ("model", "train", "features", "hogwild") if k in spec.config})
            # what the recipe resolved the "auto" keys (-1, 0) to: the values this run trained with
            params.update({f"resolved.{k}": getattr(spec, k) for k in RESOLVED_PARAMS})
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            for h in metrics["history"]:
                mlflow.log_metrics(_scalars(h, skip=("type", "epoch", "step")), step=h["step"])
            final = {f"final_{s}_{k}": float(v) for s in ("val", "test") for k, v in (metrics[s] or {}).items() if v is not None}
            mlflow.log_metrics(final)
            info = log_bundle_model(os.path.join(spec.run_dir, "model"), spec.config, spec.mlflow_registered_model)
            record = {"tracking_uri": uri, "run_id": run.info.run_id, "model_uri": info.model_uri,
                      "registered_model": spec.mlflow_registered_model or None,
                      "registered_version": info.registered_model_version}
        with open(os.path.join(spec.run_dir, "mlflow.json"), "w") as fh:
            json.dump(record, fh, indent=2)
        log.info("MLflow: run %s, model %s%s", record["run_id"], record["model_uri"],
                 f", registered as models:/{spec.mlflow_registered_model}/{record['registered_version']}"
                 if spec.mlflow_registered_model else "")
        return run.info.run_id
    except Exception as exc:  # tracking server down, auth, ...: the model is already saved
        log.warning("MLflow logging to %s failed: %s", uri, " ".join(str(exc).split())[:500])
        return None
