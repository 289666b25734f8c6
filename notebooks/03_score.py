# Databricks notebook source
# MAGIC %md
# MAGIC # Score
# MAGIC
# MAGIC Scores `score.input_path` (may contain `{date}`) with the bundle at `score.model_path` and
# MAGIC replaces exactly the `dt=<run_date>` partition of `score.output_path`.
# MAGIC
# MAGIC **Widgets**: `config`, `overrides`, `run_date` (`YYYY-MM-DD`; the job passes its own date).

# COMMAND ----------

from dl_pipeline.config import load_config
from dl_pipeline.notebook import overrides, use_repo_root, widgets

use_repo_root()  # conf/*.yaml paths are repo-relative

w = widgets(globals())
w.text("config", "conf/demo.yaml", "Config file")
w.text("overrides", "", "Overrides (a.b=1; c.d=2)")
w.text("run_date", "", "Run date (YYYY-MM-DD)")
cfg = load_config(w.get("config"), [*overrides(w.get("overrides")), f"score.run_date={w.get('run_date')}"])

# COMMAND ----------

from dl_pipeline.score import score_batch

summary = score_batch(spark, cfg)["summary"]  # noqa: F821
print(summary)
