# Databricks notebook source
# MAGIC %md
# MAGIC # Train
# MAGIC
# MAGIC Horovod data-parallel PyTorch training on the prepared dataset at `train.data_path`; writes
# MAGIC the model bundle and metrics to `train.run_dir`. On a GPU cluster each rank pins one GPU.
# MAGIC
# MAGIC **Widgets**: `config`, `overrides`, `resume` (`true` continues from the latest checkpoint).

# COMMAND ----------

from dl_pipeline.config import load_config
from dl_pipeline.notebook import overrides, use_repo_root, widgets

use_repo_root()  # conf/*.yaml paths are repo-relative

w = widgets(globals())
w.text("config", "conf/demo.yaml", "Config file")
w.text("overrides", "", "Overrides (a.b=1; c.d=2)")
w.dropdown("resume", "false", ["false", "true"], "Resume")
cfg = load_config(w.get("config"), [*overrides(w.get("overrides")), f"train.resume={w.get('resume')}"])

# COMMAND ----------

from dl_pipeline.train.driver import train_model

metrics = train_model(cfg, spark=spark)  # noqa: F821
print(metrics["summary"])
