"""The MLflow pyfunc model of a bundle, logged from code (MLflow's "models from code").

MLflow stores this file, the bundle folder (the ``bundle`` artifact) and dl_pipeline's own source
(``code``); loading the model runs this file and reads safetensors and JSON, so no cloudpickled
Python object is written or unpickled. ``predict`` takes a pandas DataFrame with the record's text
fields as string columns, in the order training read them (``model_config["text_columns"]``,
e.g. title, text), or encoded image bytes in ``model_config["image_column"]``, and returns one row
per input row: ``prediction`` (label id, label_base added; null when the row cannot be scored),
``label_name``, ``probability`` and ``reason`` ("" when scored, else why not) -- what
``dl-pipeline score`` writes for the same row (both run ``scoring.score_frame``). Through
``mlflow.pyfunc.spark_udf`` read ``prediction`` as a double: MLflow's struct conversion cannot
put a rejected row's null into an integer field.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from dl_pipeline.mlflow_io import PREDICTION_COLUMNS


class BundleModel(PythonModel):
    def load_context(self, context) -> None:
        from dl_pipeline.bundle import load_bundle

        self.bundle = load_bundle(context.artifacts["bundle"])
        self.config = dict(context.model_config or {})

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from dl_pipeline.scoring import score_frame

        bundle, cfg = self.bundle, self.config
        n = len(model_input)
        if bundle.featurizer["kind"] == "image":
            pdf = pd.DataFrame({"content": list(model_input[cfg.get("image_column", "image")]), "reason": [None] * n})
        else:
            cols = list(cfg.get("text_columns") or model_input.columns)
            given = model_input.reindex(columns=cols)  # a column left out is an empty field, as in a CSV row
            fields = given.astype(object).where(given.notna(), None)
            pdf = pd.DataFrame({"parts": fields.values.tolist(), "reason": [None] * n})
        cleaning = bundle.featurizer.get("cleaning", {})
        _, scored = score_frame(bundle, pdf, int(cfg.get("batch_size", 1024)), 0, int(cleaning.get("max_text_chars", 200_000)),
                                cleaning.get("title_separator", ". "), len(cfg.get("text_columns") or ()) + 1)
        scored.index = model_input.index
        # "" for a scored row, not None: mlflow.pyfunc.spark_udf casts a string column holding None to "None"
        scored["reason"] = [r or "" for r in scored["reason"]]
        return scored[[name for name, _ in PREDICTION_COLUMNS]]  # the columns the signature declares


mlflow.models.set_model(BundleModel())
