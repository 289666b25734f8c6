# Databricks notebook source
# MAGIC %md
# MAGIC # dl_pipeline quickstart
# MAGIC
# MAGIC Prepare -> train -> score on the sample bundled with the repository, in one notebook.
# MAGIC
# MAGIC **Widgets**
# MAGIC - `config`: YAML config, repo-relative (default `conf/demo.yaml`)
# MAGIC - `overrides`: `section.key=value` pairs separated by `;` (e.g. `train.epochs=2; train.num_proc=2`)
# MAGIC - `run_date`: the date partition the scoring step writes (`YYYY-MM-DD`, empty = today UTC)
# MAGIC
# MAGIC On Databricks install the wheel from `make dist` on the cluster (Runtime 15.4 LTS ML has
# MAGIC Spark, PyTorch and Horovod). Every cell only calls `dl_pipeline` functions.

# COMMAND ----------

from dl_pipeline.config import load_config
from dl_pipeline.notebook import overrides, use_repo_root, widgets

use_repo_root()  # conf/*.yaml paths are repo-relative

w = widgets(globals())
w.text("config", "conf/demo.yaml", "Config file")
w.text("overrides", "", "Overrides (a.b=1; c.d=2)")
w.text("run_date", "", "Run date (YYYY-MM-DD)")
cfg = load_config(w.get("config"), overrides(w.get("overrides")))

# COMMAND ----------

# MAGIC %md ## 1. Prepare: clean, featurize, shard into Petastorm

# COMMAND ----------

from dl_pipeline.prepare import prepare_dataset

manifest = prepare_dataset(spark, cfg)  # noqa: F821 (spark is given by Databricks / the runner)
print(manifest["counts"])

# COMMAND ----------

# MAGIC %md ## 2. Train with Horovod (one rank per Spark task)

# COMMAND ----------

from dl_pipeline.train.driver import train_model

metrics = train_model(cfg, spark=spark)  # noqa: F821
print(metrics["summary"])

# COMMAND ----------

# MAGIC %md ## 3. Score a date partition

# COMMAND ----------

from dl_pipeline.config import replace
from dl_pipeline.score import score_batch

summary = score_batch(spark, replace(cfg, score={"run_date": w.get("run_date")}))["summary"]  # noqa: F821
print(summary)
