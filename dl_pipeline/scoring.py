"""scoring: one batch of input rows -> its scores, the same wherever rows are moved.

What the score job runs per batch by either way of moving rows (``score.io``: Spark's readers
and writers in ``score``, the tasks' own byte ranges in ``score_tasks``) and what the MLflow
model (``mlflow_model``) runs, so a row scores the same through each: parse, check, clean and
featurize (``features``, the rules prepare uses), predict, and the output columns. Executor
code: no Spark session here, only the task's context.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dl_pipeline import features
from dl_pipeline.errors import PipelineError
from dl_pipeline.sources import parse_and_clean_lines

# Loaded once per Python worker process (Spark reuses workers across tasks), never per batch;
# keyed by path and model version, so a model retrained at the same path is loaded anew.
_MODELS: dict[tuple[str, str], Any] = {}


def worker_bundle(path: str, version: str):
    """The bundle at ``path`` whose model version the driver saw (``version``)."""
    _use_the_task_cores()
    if (path, version) not in _MODELS:
        import torch

        from dl_pipeline.bundle import load_bundle

        bundle = load_bundle(path, "cuda" if torch.cuda.is_available() else "cpu")
        if bundle.version != version:
            raise PipelineError(f"{path}: the model changed during the run ({version} -> {bundle.version}); run the date again")
        _MODELS.clear()  # one model per worker: an old version's weights are not kept around
        _MODELS[(path, version)] = bundle
    return _MODELS[(path, version)]


def _use_the_task_cores() -> None:
    """In a Spark task: torch's intra-op threads = the cores Spark gave the task (spark.task.cpus).
    Spark runs a task per core, and torch's default (every core) in each oversubscribes them."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is not None:
        import torch

        torch.set_num_threads(max(1, ctx.cpus()))


def predict_texts(bundle, texts: list[str], batch_size: int, top_k: int = 0) -> dict[str, np.ndarray]:
    """Cleaned texts -> {index [n], probability [n], topk_index [n,k], topk_prob [n,k]}."""
    feats = features.featurize_texts(texts, bundle.model_featurizer)
    return predict(bundle, feats, batch_size, top_k)


def predict(bundle, feats: dict[str, np.ndarray], batch_size: int, top_k: int) -> dict[str, np.ndarray]:
    import torch

    n = next(iter(feats.values())).shape[0]
    k = max(1, top_k)
    idx, prob = np.zeros((n, k), np.int64), np.zeros((n, k), np.float64)
    device = next(bundle.model.parameters()).device
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            batch = {name: torch.from_numpy(arr[s : s + batch_size]).to(device) for name, arr in feats.items()}
            p = torch.softmax(bundle.model(batch).float(), dim=1)
            top = torch.topk(p, k=min(k, p.shape[1]), dim=1)
            idx[s : s + batch_size, : top.indices.shape[1]] = top.indices.cpu().numpy()
            prob[s : s + batch_size, : top.values.shape[1]] = top.values.cpu().numpy()
    return {"index": idx[:, 0], "probability": prob[:, 0], "topk_index": idx, "topk_prob": prob}


def text_batch(pdf: pd.DataFrame, spec: dict[str, Any], max_chars: int, separator: str, num_fields: int):
    """Text rows -> (pdf, reasons [n] (None = scorable), features of the scorable rows or None).

    Fields split by Spark come as ``parts``; raw Zhang CSV lines as ``raw`` are parsed,
    length-checked and cleaned in one pass here (pdf gains ``label_raw``)."""
    if "parts" in pdf:  # fields split by Spark (named columns, multi-line CSV): the one rule set
        reasons, texts = list(pdf["reason"]), []
        for i, parts in enumerate(pdf["parts"]):
            text = ""
            if reasons[i] is None:
                # Scoring keeps rows with undecodable bytes (as U+FFFD), as the line path does.
                reasons[i], text = features.check_record(None if parts is None else list(parts), separator, max_chars,
                                                         reject_invalid_utf8=False)
            texts.append(text or "")
    else:
        # Scoring keeps rows with undecodable bytes (as U+FFFD), as the Spark CSV path does.
        parsed = parse_and_clean_lines(pdf["raw"], num_fields, separator, max_chars, reject_invalid_utf8=False)
        reasons = [why or text_why for why, text_why in zip(parsed.reason, parsed.text_reason, strict=True)]
        texts = [t or "" for t in parsed.text]
        pdf = pdf.assign(label_raw=parsed.label)
    reasons = [r if r is not None or t else "empty_text" for r, t in zip(reasons, texts, strict=True)]
    good = [t for t, r in zip(texts, reasons, strict=True) if r is None]
    return pdf, reasons, features.featurize_texts(good, spec) if good else None


def image_batch(pdf: pd.DataFrame, spec: dict[str, Any]):
    """Encoded images -> (reasons [n], {"image": uint8 [m, H, W, C]} of the m decodable ones or
    None), decoded and resized exactly as prepare does (features.decode_images)."""
    reasons = list(pdf["reason"])
    todo = [i for i, r in enumerate(reasons) if r is None]  # rejected rows carry no content
    pixels = []
    for i, img in zip(todo, features.decode_images(pdf["content"].iloc[todo], spec), strict=True):
        if img is None:
            reasons[i] = "undecodable_image"
        else:
            pixels.append(img)
    return reasons, {"image": np.stack(pixels)} if pixels else None


def score_frame(bundle, pdf: pd.DataFrame, batch_size: int, top_k: int, max_chars: int, separator: str,
                num_fields: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One batch of rows -> (``pdf``, gaining ``label_raw`` when it came as raw lines; its scores).

    ``pdf`` holds raw Zhang CSV lines (``raw``), fields split by Spark (``parts`` + ``reason``) or
    encoded images (``content`` + ``reason``). The scores, on ``pdf``'s index: ``prediction``
    (Int32, label_base added; null for a rejected row), ``label_name``, ``probability``, ``top_k``
    (when asked) and ``reason`` (None = scored). What the score job and the MLflow model
    (``mlflow_model.py``) both run, so a row scores the same through either."""
    if "content" in pdf:
        reasons, feats = image_batch(pdf, bundle.featurizer)
    else:
        pdf, reasons, feats = text_batch(pdf, bundle.model_featurizer, max_chars, separator, num_fields)
    base, names = bundle.labels["label_base"], bundle.labels["names"]
    ok = np.array([r is None for r in reasons], dtype=bool)
    out = pd.DataFrame(index=pdf.index)
    out["prediction"] = pd.array([None] * len(pdf), dtype="Int32")
    out["label_name"] = None
    out["probability"] = np.nan
    if feats is not None:
        pred = predict(bundle, feats, batch_size, top_k)
        out.loc[ok, "prediction"] = (pred["index"] + base).astype(np.int32)
        out.loc[ok, "label_name"] = [names[i] for i in pred["index"]]
        out.loc[ok, "probability"] = pred["probability"]
        if top_k:
            tops = [
                [{"label": int(i + base), "probability": float(p)} for i, p in zip(ri, rp, strict=False)]
                for ri, rp in zip(pred["topk_index"], pred["topk_prob"], strict=False)
            ]
            col = [None] * len(pdf)
            for j, t in zip(np.flatnonzero(ok), tops, strict=False):
                col[j] = t
            out["top_k"] = col
    if top_k and "top_k" not in out:
        out["top_k"] = None
    out["reason"] = reasons
    return pdf, out


def scored_rows(bundle, pdf: pd.DataFrame, ids: list[str], batch_size: int, top_k: int, max_chars: int, separator: str,
                num_fields: int) -> pd.DataFrame:
    """One batch of input rows -> its output rows, on pdf's index: ``ids``, prediction,
    label_name, probability[, top_k], model_version, raw (a rejected row's first 4 KiB, else
    None), reason (None = scored). What both ways of moving rows (score.io) write."""
    pdf, scored = score_frame(bundle, pdf, batch_size, top_k, max_chars, separator, num_fields)
    out = pdf[ids].copy()
    for col in scored.columns.drop("reason"):
        out[col] = scored[col]
    out["model_version"] = bundle.version
    out["raw"] = [None if r is None else (raw or "")[:4096] for r, raw in zip(scored["reason"], pdf["raw"], strict=False)]
    out["reason"] = scored["reason"]
    return out
