"""MLflow: the bundle as a pyfunc model from code, registered on a real tracking server, scored
through ``models:/`` URIs by the score job and by ``mlflow.pyfunc.spark_udf``."""

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import AG_TEST
from dl_pipeline.config import replace
from dl_pipeline.score import score_batch
from dl_pipeline.train.driver import train_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1: SQLite backend, artifacts served from a local folder."""
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", f"file://{root}/artifacts", "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}") from None
            time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def registered(ag_prepared, mlflow_server, tmp_path_factory, request):
    """A model trained with the tracking URI and a registered name, aliased 'champion'."""
    import mlflow

    cfg, _ = ag_prepared
    run = tmp_path_factory.mktemp("mlflow_run")
    cfg = replace(cfg, train={"launcher": "local", "epochs": 1, "run_dir": str(run), "mlflow_tracking_uri": mlflow_server,
                              "mlflow_experiment": "dlp-test", "mlflow_registered_model": "dlp-news"})
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server  # what score resolves models:/ through
    request.addfinalizer(lambda: os.environ.pop("MLFLOW_TRACKING_URI", None))
    train_model(cfg)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    client.set_registered_model_alias("dlp-news", "champion", "1")
    return cfg, json.load(open(run / "mlflow.json")), client


def _scores(spark, cfg, model_path, out):
    cfg = replace(cfg, score={"model_path": model_path, "input_path": str(out.parent / "input.csv"), "output_path": str(out),
                              "run_date": "2026-12-06", "id_columns": ["row_number"]})
    summary = score_batch(spark, cfg)["summary"]
    return summary, pq.read_table(f"{out}/dt=2026-12-06").to_pandas().sort_values("row_number").reset_index(drop=True)


def test_registered_model_scores_like_the_bundle_through_models_uris_and_spark_udf(spark, registered, tmp_path):
    import mlflow
    from pyspark.sql import functions as F

    cfg, record, client = registered
    # the run logged a pyfunc model from code, registered as version 1: no pickle anywhere in it
    assert record["registered_model"] == "dlp-news" and int(record["registered_version"]) == 1
    local = mlflow.artifacts.download_artifacts(artifact_uri="models:/dlp-news/1", dst_path=str(tmp_path / "dl"))
    files = [os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs]
    assert "artifacts/model/model.safetensors" in files and "mlflow_model.py" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    mlmodel = open(os.path.join(local, "MLmodel")).read()
    assert "signature:" in mlmodel and "title" in mlmodel

    with gzip.open(AG_TEST, "rt", encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(300)]
    (tmp_path / "input.csv").write_text("".join(lines) + '"1","",""\n')  # and a row with no text: rejected alike
    bundle = os.path.join(cfg.train.run_dir, "model")
    base, by_bundle = _scores(spark, cfg, bundle, tmp_path / "by_bundle")
    for i, uri in enumerate(("models:/dlp-news/1", "models:/dlp-news@champion", f"runs:/{record['run_id']}/model")):
        summary, by_uri = _scores(spark, cfg, uri, tmp_path / f"by_uri{i}")
        assert summary["model_uri"] == uri and summary["model_version"] == base["model_version"]
        assert (summary["scored"], summary["rejected"]) == (base["scored"], base["rejected"]) == (300, 1)
        assert by_uri["prediction"].tolist() == by_bundle["prediction"].tolist()
        np.testing.assert_allclose(by_uri["probability"], by_bundle["probability"], atol=1e-6)

    # the same model as a Spark UDF, on the same rows split into fields by Spark. prediction is read
    # as a double: MLflow's struct conversion cannot put the null of a rejected row in an int field
    rows = (spark.read.csv(str(tmp_path / "input.csv"), schema="label string, title string, text string", escape='"')
            .withColumn("row_number", F.monotonically_increasing_id() + 1))
    udf = mlflow.pyfunc.spark_udf(spark, "models:/dlp-news@champion", env_manager="local",
                                  result_type="prediction double, label_name string, probability double, reason string")
    got = rows.select("row_number", udf(F.struct("title", "text")).alias("p")).select("row_number", "p.*").toPandas()
    got = got.sort_values("row_number").reset_index(drop=True)
    assert got["prediction"][:300].astype(int).tolist() == by_bundle["prediction"].astype(int).tolist()
    np.testing.assert_allclose(got["probability"][:300], by_bundle["probability"], atol=1e-6)
    assert got["reason"].tolist() == [""] * 300 + ["empty_text"] and np.isnan(got["prediction"][300])


def test_an_unknown_model_uri_is_one_line_exit_2(registered, tmp_path):
    cmd = [sys.executable, "-m", "dl_pipeline.cli", "score", "--set", "score.model_path=models:/no-such-model@champion",
           "--set", f"score.input_path={AG_TEST}", "--set", f"score.output_path={tmp_path}/out"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": registered[1]["tracking_uri"]})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "models:/no-such-model@champion" in errors[0] and "Traceback" not in proc.stderr
