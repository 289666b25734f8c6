"""Rank-0 outputs: atomic checkpoints, the metrics log, the model bundle and the plots.

``<run_dir>/``::

    checkpoints/latest.pt   model + optimizer + epoch/step + RNG state (temp file + rename)
    checkpoints/best.pt     weights with the lowest val loss so far
    metrics.jsonl           one JSON line per logged step / epoch
    metrics.json            final {val, test: {accuracy, loss, rows}, ...}
    learning_curve.png, confusion_matrix.png
    model/                  the bundle (dl_pipeline.bundle)
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np


def _dir(run_dir: str, *parts: str) -> str:
    path = os.path.join(run_dir, *parts)
    os.makedirs(os.path.dirname(path) if parts else path, exist_ok=True)
    return path


def _atomic_torch_save(obj: Any, path: str) -> None:
    import torch

    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash leaves the previous checkpoint whole


def save(run_dir: str, model, optimizer, state: dict) -> None:
    import torch

    _atomic_torch_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "state": state,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        },
        _dir(run_dir, "checkpoints", "latest.pt"),
    )


def load_latest(run_dir: str, model, optimizer) -> dict | None:
    """Restore model/optimizer/RNG from checkpoints/latest.pt; returns the loop state or None."""
    import torch

    path = os.path.join(run_dir, "checkpoints", "latest.pt")
    if not os.path.exists(path):
        return None
    # Our own file, written by save() above; optimizer state and RNG tuples need full unpickling.
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(ck["model"])
    if optimizer is not None and ck.get("optimizer"):
        optimizer.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"]["torch"])
    np.random.set_state(ck["rng"]["numpy"])
    random.setstate(ck["rng"]["python"])
    return ck["state"]


def save_best(run_dir: str, model) -> None:
    _atomic_torch_save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, _dir(run_dir, "checkpoints", "best.pt"))


def load_best(run_dir: str, model) -> None:
    import torch

    path = os.path.join(run_dir, "checkpoints", "best.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


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


def write_outputs(p: dict[str, Any], model, metrics: dict, confusion: list[list[float]] | None) -> None:
    """metrics.json, plots and the model bundle; rank 0 only."""
    from dl_pipeline.bundle import save_bundle

    run_dir = p["run_dir"]
    out = {**metrics, "test_confusion": confusion}
    tmp = _dir(run_dir, "metrics.json") + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=2)
    os.replace(tmp, os.path.join(run_dir, "metrics.json"))
    _plots(run_dir, metrics["history"], confusion, p["label_names"])
    labels = {"label_base": p["label_base"], "names": p["label_names"]}
    final = {"val": metrics["val"], "test": metrics["test"]}
    save_bundle(os.path.join(run_dir, "model"), model, p["model_spec"], p["featurizer"], labels, final)
    log_to_mlflow(p, metrics)


def _flat(prefix: str, doc: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(key, v))
        elif not isinstance(v, (list, tuple)):
            out[key] = v
    return out


def log_to_mlflow(p: dict[str, Any], metrics: dict) -> str | None:
    """Log params, per-epoch and final metrics and the bundle to MLflow; a no-op unless a
    tracking URI is configured (train.mlflow_tracking_uri or MLFLOW_TRACKING_URI). Returns the
    run id. Training never fails because of tracking: problems are logged as warnings."""
    import logging

    log = logging.getLogger("dl_pipeline.train")
    uri = p.get("mlflow_tracking_uri")
    if not uri:
        return None
    try:
        import mlflow
    except ImportError:
        log.warning("MLflow tracking URI %s is set but mlflow is not installed; skipping MLflow logging", uri)
        return None
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(p["mlflow_experiment"])
        with mlflow.start_run() as run:
            params = _flat("", {k: p["config"][k] for k in ("model", "train", "features", "hogwild") if k in p.get("config", {})})
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            for h in metrics["history"]:
                mlflow.log_metrics({k: float(v) for k, v in h.items() if k not in ("type", "epoch", "step")}, step=h["step"])
            final = {f"final_{s}_{k}": float(v) for s in ("val", "test") for k, v in (metrics[s] or {}).items() if v is not None}
            mlflow.log_metrics(final)
            mlflow.log_artifacts(os.path.join(p["run_dir"], "model"), artifact_path="model")
            return run.info.run_id
    except Exception as exc:  # tracking server down, auth, ...: the model is already saved
        log.warning("MLflow logging to %s failed: %s", uri, exc)
        return None
