"""Where users run: the Databricks bundle, the notebooks, spark-submit on a standalone cluster."""

import glob
import json
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import time
import zipfile

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import AG_TEST, AG_TRAIN, ROOT, SPARK_LAUNCHER, shard_digests

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.py")))


def _console_scripts():
    text = open(os.path.join(ROOT, "setup.py")).read()
    return dict(re.findall(r'"([\w-]+)=([\w.]+:\w+)"', text))


def test_databricks_bundle_names_only_things_that_exist():
    from dl_pipeline.cli import COMMANDS

    doc = yaml.safe_load(open(os.path.join(ROOT, "databricks.yml")))
    scripts = _console_scripts()
    assert os.path.exists(os.path.join(ROOT, doc["variables"]["config"]["default"]))
    tasks = [t for job in doc["resources"]["jobs"].values() for t in job["tasks"]]
    assert len(tasks) >= 4
    for task in tasks:
        if "python_wheel_task" in task:
            w = task["python_wheel_task"]
            assert w["package_name"] == "dl_pipeline" and w["entry_point"] in scripts
            assert w["parameters"][0] in COMMANDS
            for i, arg in enumerate(w["parameters"]):
                if arg == "--set":
                    assert re.match(r"^\w+\.\w+=", w["parameters"][i + 1]), w["parameters"][i + 1]
        elif "notebook_task" in task:
            path = os.path.join(ROOT, task["notebook_task"]["notebook_path"])
            assert os.path.exists(path), path
            assert os.path.exists(os.path.join(ROOT, task["notebook_task"]["base_parameters"]["config"]))
        else:
            pytest.fail(f"unexpected task type in {task['task_key']}")
    score = doc["resources"]["jobs"]["dl_pipeline_score"]
    assert len(score["schedule"]["quartz_cron_expression"].split()) in (6, 7)
    assert "--run-date" in score["tasks"][0]["python_wheel_task"]["parameters"]
    dev = doc["targets"]["dev"]["resources"]["jobs"]["dl_pipeline_score"]["schedule"]
    assert dev["pause_status"] == "PAUSED"
    train = doc["resources"]["jobs"]["dl_pipeline_train"]["job_clusters"][0]["new_cluster"]
    assert "gpu-ml" in train["spark_version"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebooks_are_databricks_source_format(path):
    text = open(path).read()
    assert text.startswith("# Databricks notebook source\n")
    assert "# COMMAND ----------" in text and "# MAGIC %md" in text
    assert "**Widgets**" in text
    # cells hold no logic of their own: no defs, classes or loops
    assert not re.search(r"^\s*(def |class |for |while )", text, re.M)


@pytest.mark.slow
def test_every_notebook_runs_end_to_end(spark, tmp_path, monkeypatch):
    common = [f"data.train_path={AG_TRAIN}", f"data.test_path={AG_TEST}", f"prepare.output_path={tmp_path}/prepared",
              f"train.data_path={tmp_path}/prepared", f"train.run_dir={tmp_path}/run", "shard.max_workers=2",
              "train.epochs=1", "train.num_proc=2", f"train.launcher={SPARK_LAUNCHER}", "train.progress=false",
              f"score.model_path={tmp_path}/run/model",
              f"score.output_path={tmp_path}/scores"]
    monkeypatch.chdir(os.path.join(ROOT, "notebooks"))  # as Databricks Repos runs them
    for name, date in (("01_prepare.py", ""), ("02_train.py", ""), ("03_score.py", "2026-11-01"), ("00_quickstart.py", "2026-11-02")):
        monkeypatch.setenv("DL_PIPELINE_WIDGETS", json.dumps({"overrides": "; ".join(common), "run_date": date}))
        runpy.run_path(os.path.join(ROOT, "notebooks", name), init_globals={"spark": spark}, run_name="__main__")
    for date in ("2026-11-01", "2026-11-02"):
        assert pq.read_table(f"{tmp_path}/scores/dt={date}").num_rows == 7600
    assert os.path.exists(f"{tmp_path}/run/model/model.safetensors")


# ---------------------------------------------------------------------------------------------
# A real standalone cluster: one master and two workers on 127.0.0.1, spark-submit against it.
# ---------------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise TimeoutError(what)


@pytest.fixture
def standalone_cluster(tmp_path):
    import pyspark

    home = os.path.dirname(pyspark.__file__)
    env = {**os.environ, "SPARK_HOME": home, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
    port = _free_port()
    master_url = f"spark://127.0.0.1:{port}"
    cls = os.path.join(home, "bin", "spark-class")
    procs, logs = [], []

    def start(args, name):
        log = open(tmp_path / f"{name}.log", "w")
        logs.append((name, tmp_path / f"{name}.log"))
        procs.append(subprocess.Popen([cls, *args], env=env, stdout=log, stderr=subprocess.STDOUT))

    try:
        start(["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
               "--webui-port", str(_free_port())], "master")
        _wait_for(lambda: "I have been elected leader" in open(tmp_path / "master.log").read(), 90, "master start")
        for i in range(2):
            start(["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "1", "--memory", "1536m",
                   "--webui-port", str(_free_port()), "--work-dir", str(tmp_path / f"work{i}"), master_url], f"worker{i}")
        _wait_for(lambda: open(tmp_path / "master.log").read().count("Registering worker") >= 2, 90, "workers")
        yield master_url, env
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_spark_submit_on_standalone_cluster(standalone_cluster, ag_prepared, tmp_path):
    master, env = standalone_cluster
    zpath = tmp_path / "dl_pipeline.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in glob.glob(os.path.join(ROOT, "dl_pipeline", "**", "*.py"), recursive=True):
            z.write(f, os.path.relpath(f, ROOT))
    shutil.copy(os.path.join(ROOT, "conf", "demo.yaml"), tmp_path / "demo.yaml")
    submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
    common = ["--set", f"data.train_path={AG_TRAIN}", "--set", f"data.test_path={AG_TEST}",
              "--set", f"prepare.output_path={tmp_path}/prepared", "--set", f"train.data_path={tmp_path}/prepared",
              "--set", f"train.run_dir={tmp_path}/run", "--set", "shard.max_workers=2", "--set", "train.epochs=1",
              "--set", "train.num_proc=2", "--set", "horovod.nics=[lo]", "--set", f"train.launcher={SPARK_LAUNCHER}",
              "--set", "train.progress=false",
              "--set", f"score.model_path={tmp_path}/run/model", "--set", f"score.input_path={AG_TEST}",
              "--set", f"score.output_path={tmp_path}/scores"]

    def run(job, *extra):
        cmd = [submit, "--master", master, "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.ui.enabled=false",
               "--conf", f"spark.pyspark.python={sys.executable}", "--executor-memory", "1g",
               # As the README says for executors that have dl_pipeline installed (this venv has).
               "--conf", "spark.python.daemon.module=dl_pipeline.pyworker",
               "--py-files", str(zpath), "--files", str(tmp_path / "demo.yaml"),
               os.path.join(ROOT, "jobs", job), "--config", str(tmp_path / "demo.yaml"), *common, *extra]
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{job} failed:\n{proc.stderr[-4000:]}"
        return proc

    run("prepare_data.py")
    manifest = json.load(open(tmp_path / "prepared" / "manifest.json"))
    assert manifest["counts"]["input_rows"] == 18029
    # Same input and settings as the session's local run: byte-identical shards, although two
    # executor JVMs on another master (and another shuffle partition count) wrote them.
    local = shard_digests(ag_prepared[0].prepare.output_path)
    assert len(local) >= 16 and shard_digests(str(tmp_path / "prepared")) == local
    run("train.py")
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["world_size"] == 2 and metrics["test"]["rows"] == 7600
    scored = run("score.py", "--run-date", "2026-11-22")
    summary = json.loads(scored.stdout.strip().splitlines()[-1])
    assert summary["rows_in"] == summary["scored"] == 7600
    assert pq.read_table(f"{tmp_path}/scores/dt=2026-11-22").num_rows == 7600
    # the three jobs really ran on the cluster (a local master would register nothing)
    assert open(tmp_path / "master.log").read().count("Registering app") == 3


_ZIP_CHECK = r"""
import importlib, os, sys, zipfile, zipimport
path = sys.argv[1]
with zipfile.ZipFile(path, "w") as z:
    z.writestr("mod_a.py", "A = 1\n")
sys.path.insert(0, path)
import mod_a
reads = []
original = zipimport._read_directory
zipimport._read_directory = lambda archive: reads.append(archive) or original(archive)
from dl_pipeline.pyworker import patch_zipimport
patch_zipimport()
importlib.invalidate_caches(); importlib.invalidate_caches()
unchanged = len(reads)
with zipfile.ZipFile(path, "a") as z:  # a new --py-files upload under the same name
    z.writestr("mod_b.py", "B = 2\n")
importlib.invalidate_caches()
import mod_b
print(unchanged, len(reads), mod_a.A, mod_b.B)
"""


def test_worker_daemon_rereads_a_zip_only_when_it_changed(tmp_path):
    out = subprocess.run([sys.executable, "-c", _ZIP_CHECK, str(tmp_path / "lib.zip")], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "1", "1", "2"]


def test_worker_daemon_is_set_only_where_the_workers_python_can_import_it(tmp_path):
    from dl_pipeline.spark import _worker_daemon_conf

    assert _worker_daemon_conf(sys.executable) == {"spark.python.daemon.module": "dl_pipeline.pyworker"}
    bare = tmp_path / "python"  # an interpreter without dl_pipeline: Spark's own daemon stays
    bare.write_text("#!/bin/sh\nexit 1\n")
    bare.chmod(0o755)
    assert _worker_daemon_conf(str(bare)) == {}
    assert _worker_daemon_conf(str(tmp_path / "missing")) == {}


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the CPython fix (gh-103200) is in 3.12")
def test_local_sessions_run_python_tasks_under_the_patched_daemon(spark):
    def probe(_):
        import importlib
        import zipimport

        reads, original = [], zipimport._read_directory
        zipimport._read_directory = lambda archive: reads.append(archive) or original(archive)
        try:
            importlib.invalidate_caches()
        finally:
            zipimport._read_directory = original
        yield len(reads)

    # Unpatched, every task re-read pyspark.zip, py4j's zip and Spark's jars: ~80 ms of CPU here.
    assert spark.sparkContext.parallelize(range(2), 2).mapPartitions(probe).collect() == [0, 0]


def test_worker_daemon_collects_young_garbage_after_a_task_and_leaves_old_objects_alone():
    import gc
    import weakref

    from dl_pipeline.pyworker import _YoungGenerationGC

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return a

    shim = _YoungGenerationGC()
    young = weakref.ref(cycle())  # a task's leftover reference cycle
    assert young() is not None
    shim.collect()
    assert young() is None
    kept = cycle()
    gc.collect()  # kept survives a full collection: it is old now
    old = weakref.ref(kept)
    del kept
    shim.collect()  # the per-task collection does not walk the old generation...
    assert old() is not None
    gc.collect()  # ...Python's own full collections still free it
    assert old() is None
    assert shim.get_threshold() == gc.get_threshold()  # everything else is the gc module


def test_local_sessions_run_python_tasks_with_the_young_generation_collection(spark):
    def probe(_):
        import sys

        yield type(sys.modules["pyspark.daemon"].gc).__name__

    assert spark.sparkContext.parallelize(range(2), 2).mapPartitions(probe).collect() == ["_YoungGenerationGC"] * 2


# The bundle's top level and a variable's keys (docs.databricks.com/dev-tools/bundles/settings):
# what the CLI's schema allows there; the resources are checked by Databricks' own models below.
BUNDLE_KEYS = {"bundle", "variables", "artifacts", "resources", "targets", "include", "workspace", "permissions", "run_as",
               "sync", "presets", "experimental", "python", "scripts"}
VARIABLE_KEYS = {"description", "default", "type", "lookup"}
TARGET_KEYS = {"mode", "default", "resources", "variables", "workspace", "bundle", "artifacts", "presets", "run_as",
               "permissions", "sync", "git", "cluster_id", "compute_id"}


def _merged(base, override):
    """A target's override merged onto the base resource, as `databricks bundle` merges them."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _merged(base.get(k), v) if k in base else v for k, v in override.items()} | \
            {k: v for k, v in base.items() if k not in override}
    return override


def _bundle_problems(doc):
    """Every problem Databricks' own job models (databricks-bundles) and the bundle schema find in
    a parsed databricks.yml, each target's merged jobs included."""
    from databricks.bundles.jobs import Job

    problems = [f"unknown top-level key {k!r}" for k in set(doc) - BUNDLE_KEYS]
    declared = set(doc.get("variables", {}))
    for name, var in doc.get("variables", {}).items():
        problems += [f"variables.{name}: unknown key {k!r}" for k in set(var) - VARIABLE_KEYS]
    used = set(re.findall(r"\$\{var\.(\w+)\}", json.dumps(doc)))
    problems += [f"${{var.{v}}} is not declared under variables" for v in sorted(used - declared)]
    jobs = doc.get("resources", {}).get("jobs", {})
    checks = [(f"resources.jobs.{n}", j) for n, j in jobs.items()]
    for tname, target in doc.get("targets", {}).items():
        problems += [f"targets.{tname}: unknown key {k!r}" for k in set(target) - TARGET_KEYS]
        for n, j in target.get("resources", {}).get("jobs", {}).items():
            if n not in jobs:
                problems.append(f"targets.{tname}.resources.jobs.{n}: no such job")
            checks.append((f"targets.{tname}.resources.jobs.{n}", _merged(jobs.get(n, {}), j)))
    for where, job in checks:
        try:
            Job.from_dict(job)
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}: {exc}")
    return problems


def test_databricks_bundle_passes_databricks_own_job_models():
    doc = yaml.safe_load(open(os.path.join(ROOT, "databricks.yml")))
    assert _bundle_problems(doc) == []
    score = doc["resources"]["jobs"]["dl_pipeline_score"]
    assert score["tasks"][0]["max_retries"] >= 1 and score["email_notifications"]["on_failure"]
    assert score["max_concurrent_runs"] == 1 and score["timeout_seconds"] > 0
    # the check can fail: unknown keys and wrong types, at any depth, in a target too
    broken = [
        lambda d: d["resources"]["jobs"]["dl_pipeline_score"].update(max_concurent_runs=1),
        lambda d: d["resources"]["jobs"]["dl_pipeline_score"]["tasks"][0].update(max_retries="twice"),
        lambda d: d["resources"]["jobs"]["dl_pipeline_train"]["tasks"][0]["python_wheel_task"].update(entrypoint="x"),
        lambda d: d["targets"]["dev"]["resources"]["jobs"]["dl_pipeline_score"]["schedule"].update(pause="PAUSED"),
        lambda d: d["variables"]["config"].update(defualt="x"),
        lambda d: d["resources"]["jobs"]["dl_pipeline_prepare"]["tasks"][0]["python_wheel_task"]["parameters"].append("${var.nope}"),
        lambda d: d.update(target={}),
    ]
    for i, breaks in enumerate(broken):
        doc = yaml.safe_load(open(os.path.join(ROOT, "databricks.yml")))
        breaks(doc)
        assert _bundle_problems(doc), i
