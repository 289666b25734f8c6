"""MLflow: a bundle logged as a pyfunc model (and registered), and ``models:/`` URIs for scoring.

Driver-side only. The logged model is defined from code (``mlflow_model.py``): MLflow keeps that
file, the bundle folder and dl_pipeline's source, never a pickled object.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from dl_pipeline import fsutil
from dl_pipeline.errors import UserError

MODEL_URI_PREFIXES = ("models:/", "runs:/")
PREDICTION_COLUMNS = (("prediction", "integer"), ("label_name", "string"), ("probability", "double"), ("reason", "string"))


def is_model_uri(path: str) -> bool:
    return path.startswith(MODEL_URI_PREFIXES)


def log_bundle_model(bundle_dir: str, config: dict[str, Any], registered_name: str = ""):
    """Log ``bundle_dir`` as the active run's pyfunc model ``model`` (signature, input example,
    pinned requirements) and register it as ``registered_name`` when given. Returns MLflow's
    ModelInfo (``model_uri``, ``registered_model_version``)."""
    import mlflow
    import pandas as pd
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    import dl_pipeline

    with open(os.path.join(bundle_dir, "featurizer.json")) as fh:
        featurizer = json.load(fh)
    data, score = config.get("data", {}), config.get("score", {})
    model_config: dict[str, Any] = {"batch_size": int(score.get("batch_size", 1024))}
    if featurizer["kind"] == "image":
        column = score.get("image_column", "image")
        model_config["image_column"] = column
        inputs = Schema([ColSpec("binary", column)])
        example = None  # a blank image says nothing about the data
    else:
        columns = list(data.get("text_columns") or ("text",))
        model_config["text_columns"] = columns
        inputs = Schema([ColSpec("string", c, required=False) for c in columns])
        example = pd.DataFrame({c: [f"an example {c}"] for c in columns})
    outputs = Schema([ColSpec(t, name, required=False) for name, t in PREDICTION_COLUMNS])
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=os.path.join(os.path.dirname(__file__), "mlflow_model.py"),
        artifacts={"bundle": bundle_dir},
        code_paths=[os.path.dirname(dl_pipeline.__file__)],
        model_config=model_config,
        signature=ModelSignature(inputs=inputs, outputs=outputs),
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy", "numba", "pandas", "PyYAML", "fsspec",
                          "Pillow"],
        registered_model_name=registered_name or None,
    )


def resolve_bundle(path: str, cache_url: str) -> str:
    """``score.model_path`` -> a bundle every executor can read. A bundle path is returned as is;
    a ``models:/<name>/<version>``, ``models:/<name>@<alias>`` or ``runs:/<run id>/model`` URI is
    resolved through MLflow (MLFLOW_TRACKING_URI / the registry URI) and its bundle copied once to
    ``<cache_url>/<model version>`` (the score output's ``_models``), so executors on other
    machines read it without MLflow credentials."""
    if not is_model_uri(path):
        return path
    try:
        import mlflow
    except ImportError:
        raise UserError(f"score.model_path={path}: an MLflow model URI needs mlflow: pip install mlflow-skinny") from None
    local = tempfile.mkdtemp(prefix="dlp-mlflow-model-")
    try:
        try:
            root = mlflow.artifacts.download_artifacts(artifact_uri=path, dst_path=local)
        except Exception as exc:  # MlflowException, auth, network, storage errors: all the user's to fix
            first = (" ".join(str(getattr(exc, "message", exc)).split()) or type(exc).__name__)[:300]
            raise UserError(f"score.model_path={path}: {first} (check the model name, version or alias, and "
                            "MLFLOW_TRACKING_URI)") from None
        bundle = _bundle_dir(root)
        from dl_pipeline.bundle import model_version_at

        version = model_version_at(bundle) if bundle else None
        if not version:
            raise UserError(f"score.model_path={path}: not a dl_pipeline model (no 'bundle' artifact in its MLmodel); log one "
                            "with `dl-pipeline train` and train.mlflow_tracking_uri set")
        target = fsutil.join(cache_url, version)
        if not fsutil.exists(fsutil.join(target, "versions.json")):
            _copy_bundle(bundle, target)
        return target
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _copy_bundle(bundle: str, target_url: str) -> None:
    """Copy a local bundle folder to ``target_url`` (any filesystem), ``versions.json`` last: the
    cache counts a bundle as whole once that file is there. A partial copy left by a crash is
    written over; two runs copying the same version write the same bytes."""
    from dl_pipeline.bundle import FILES

    fs, dst = fsutil.fs_and_path(target_url)
    fs.makedirs(dst, exist_ok=True)
    for name in sorted(FILES, key=lambda f: f == "versions.json"):
        fs.put_file(os.path.join(bundle, name), f"{dst.rstrip('/')}/{name}")


def _bundle_dir(model_dir: str) -> str | None:
    """The bundle folder inside a downloaded pyfunc model: its MLmodel's ``bundle`` artifact."""
    import yaml

    try:
        with open(os.path.join(model_dir, "MLmodel")) as fh:
            doc = yaml.safe_load(fh)
        return os.path.join(model_dir, doc["flavors"]["python_function"]["artifacts"]["bundle"]["path"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
