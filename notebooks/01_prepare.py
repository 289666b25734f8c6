# Databricks notebook source
# MAGIC %md
# MAGIC # Prepare
# MAGIC
# MAGIC Reads `data.train_path` / `data.test_path`, rejects bad rows with a reason, featurizes and
# MAGIC writes Petastorm `train/ val/ test/` plus `manifest.json` under `prepare.output_path`.
# MAGIC
# MAGIC **Widgets**: `config` (YAML, repo-relative), `overrides` (`a.b=1; c.d=2`).

# COMMAND ----------

from dl_pipeline.config import load_config
from dl_pipeline.notebook import overrides, use_repo_root, widgets

use_repo_root()  # conf/*.yaml paths are repo-relative

w = widgets(globals())
w.text("config", "conf/demo.yaml", "Config file")
w.text("overrides", "", "Overrides (a.b=1; c.d=2)")
cfg = load_config(w.get("config"), overrides(w.get("overrides")))

# COMMAND ----------

from dl_pipeline.prepare import prepare_dataset

manifest = prepare_dataset(spark, cfg)  # noqa: F821
print(manifest["counts"], manifest["rejects_by_reason"])
