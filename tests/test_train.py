"""Training: real Petastorm shards, real Horovod ranks (Gloo) inside the test Spark session."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from conftest import AG_TRAIN, HAS_HOROVOD, ROOT, SPARK_LAUNCHER, requires_horovod, requires_petastorm
from dl_pipeline.config import load_config, replace
from dl_pipeline.errors import UserError
from dl_pipeline.prepare import prepare_dataset
from dl_pipeline.train.driver import train_model


@pytest.fixture(scope="module")
def small_uneven(spark, tmp_path_factory):
    """1,200 real AG News rows in 3 row groups: 2 ranks get shards of 2 and 1 groups."""
    import gzip

    tmp = tmp_path_factory.mktemp("small")
    with gzip.open(AG_TRAIN, "rt", encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(1200)]
    (tmp / "train.csv").write_text("".join(lines))
    cfg = load_config(None, [
        f"data.train_path={tmp}/train.csv", "data.num_classes=4", f"prepare.output_path={tmp}/prepared",
        "shard.max_workers=1", "shard.row_groups_per_worker=3", "shard.val_fraction=0.2", "shard.test_fraction=0.1",
        "features.chars=false", f"train.data_path={tmp}/prepared", f"train.run_dir={tmp}/run", "train.progress=false",
    ])
    manifest = prepare_dataset(spark, cfg)
    assert manifest["splits"]["train"]["row_groups"] == 3
    return cfg


def _final_loss(run_dir):
    return json.load(open(os.path.join(run_dir, "metrics.json")))["val"]["loss"]


@pytest.mark.parametrize("launcher, reader", [pytest.param("spark", "petastorm", marks=requires_horovod),
                                              ("torch_distributor", "arrow")])
def test_two_ranks_match_one_rank_with_same_global_batch(spark, ag_prepared, tmp_path, launcher, reader):
    """Horovod (horovod.spark.run, Petastorm) and torch.distributed (TorchDistributor, pyarrow
    reader): 2 ranks with half the batch each track 1 rank."""
    cfg, _ = ag_prepared
    common = {"epochs": 1, "steps_per_epoch": 60, "optimizer": "adam", "lr": 0.01,
              "scale_lr": False, "warmup_epochs": 0.0, "seed": 7}
    one = train_model(replace(cfg, train={**common, "launcher": "local", "batch_size": 64, "run_dir": str(tmp_path / "one")}))
    two = train_model(replace(cfg, train={**common, "launcher": launcher, "reader": reader, "num_proc": 2, "batch_size": 32,
                                          "run_dir": str(tmp_path / "two")}), spark=spark)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["global_step"] == two["global_step"] == 60
    # Same global batch and seed: the averaged-gradient run tracks the single-process run.
    assert abs(one["val"]["loss"] - two["val"]["loss"]) < 0.05 * one["val"]["loss"]
    assert abs(one["val"]["accuracy"] - two["val"]["accuracy"]) < 0.05
    assert one["val"]["accuracy"] > 0.5 and two["val"]["accuracy"] > 0.5
    # Per-rank figures come from every rank (allreduced), not rank 0 copied.
    waits = two["history"][0]["data_wait_fraction_per_rank"]
    assert len(waits) == 2 and all(0 <= w < 1 for w in waits)
    assert len(two["peak_rss_mb_per_rank"]) == 2 and all(m > 50 for m in two["peak_rss_mb_per_rank"])
    assert two["timing"]["rank_total_s"] >= two["timing"]["train_steps_s"] > 0


def test_uneven_shards_finish_without_hanging(spark, small_uneven, tmp_path):
    cfg = replace(small_uneven, train={"launcher": SPARK_LAUNCHER, "num_proc": 2, "epochs": 2, "batch_size": 16,
                                       "run_dir": str(tmp_path / "run")})
    metrics = train_model(cfg, spark=spark)
    splits = json.load(open(os.path.join(small_uneven.prepare.output_path, "manifest.json")))["splits"]
    assert metrics["world_size"] == 2
    assert metrics["global_step"] == 2 * metrics["history"][0]["step"]
    assert metrics["history"][0]["step"] == splits["train"]["rows"] // 32  # from the manifest, the same on both ranks
    assert metrics["test"]["rows"] == splits["test"]["rows"] > 0  # every test row once, over both (uneven) shards


def test_hogwild_learns(ag_prepared, tmp_path):
    cfg, _ = ag_prepared
    metrics = train_model(replace(cfg, train={"launcher": "local", "mode": "hogwild", "epochs": 1,
                                              "run_dir": str(tmp_path / "hog")},
                                  hogwild={"workers": 2, "sync_every": 20}))
    assert metrics["mode"] == "hogwild"
    assert metrics["test"]["accuracy"] > 0.6, metrics["test"]  # chance is 0.25
    history = [json.loads(line) for line in open(tmp_path / "hog" / "metrics.jsonl")]
    assert history[-1]["type"] == "epoch"


def _cli_train(run_dir, data, *extra, env=None, wait=True):
    cmd = [sys.executable, "-m", "dl_pipeline.cli", "train", "--set", f"train.data_path={data}",
           "--set", f"train.run_dir={run_dir}", "--set", "train.launcher=local", "--set", "train.epochs=2",
           "--set", "train.steps_per_epoch=40", "--set", "train.checkpoint_every_steps=25", "--set", "train.progress=false",
           *extra]
    env = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    # output through files, not pipes: an orphaned worker holding a pipe would hang the test, not fail it
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        rc = subprocess.run(cmd, stdout=out, stderr=err, text=True, cwd=ROOT, env=env, timeout=300).returncode
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, rc, out.read(), err.read())


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


def _processes_marked(mark):
    """pids of live processes whose environment holds ``DLP_TEST_MARK=mark`` (incl. orphans)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read()
        except OSError:
            continue
        if f"DLP_TEST_MARK={mark}".encode() in env.split(b"\0"):
            found.append(int(pid))
    return found


@pytest.mark.parametrize("cache_mb", ["1024", "0"], ids=["resident", "streamed"])
def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(small_uneven, tmp_path, cache_mb):
    data, cache = small_uneven.prepare.output_path, ("--set", f"train.cache_mb={cache_mb}")
    whole = _cli_train(tmp_path / "whole", data, *cache)
    assert whole.returncode == 0, whole.stderr[-2000:]
    crashed = _cli_train(tmp_path / "run", data, *cache, env={"DL_PIPELINE_FAIL_AT_STEP": "60"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.json").exists()
    resumed = _cli_train(tmp_path / "run", data, *cache, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ("held in memory" if cache_mb != "0" else "streamed from Parquet") in resumed.stderr
    assert "resumed from step 50" in resumed.stderr  # the step-25 and step-50 checkpoints, then epoch 1 at 40
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["global_step"] == 80 and metrics["epochs_run"] == 2
    # same seed, same batches (seeded per epoch), Adam state and RNGs restored: the same model
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "run")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    assert metrics["test"] == json.load(open(tmp_path / "whole" / "metrics.json"))["test"]


# train.lr: 80 forced steps at the recipe's small-data LR (0.02 x 16/256) leave the model near chance
HOGWILD = ["--set", "train.mode=hogwild", "--set", "hogwild.workers=2", "--set", "hogwild.sync_every=5", "--set", "train.lr=0.02"]


def test_hogwild_killed_mid_epoch_resumes_from_its_mid_epoch_checkpoint(small_uneven, tmp_path):
    data, mark = small_uneven.prepare.output_path, f"hog-resume-{os.getpid()}"
    # rounds of 2 workers x 5 steps: checkpoints when steps 30 and 50 are done, the kill at 60
    crashed = _cli_train(tmp_path / "run", data, *HOGWILD, env={"DL_PIPELINE_FAIL_AT_STEP": "60", "DLP_TEST_MARK": mark})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    deadline = time.time() + 10
    while _processes_marked(mark) and time.time() < deadline:
        time.sleep(0.2)
    assert not _processes_marked(mark), "Hogwild workers outlived their killed rank"
    resumed = _cli_train(tmp_path / "run", data, *HOGWILD, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 50" in resumed.stderr
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["mode"] == "hogwild" and metrics["global_step"] == 80 and metrics["epochs_run"] == 2
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2]  # epoch 1 from the first run, 2 after
    assert metrics["test"]["accuracy"] > 0.4  # 4 classes; learns from 1,200 rows


def test_a_killed_hogwild_worker_fails_the_job_fast(small_uneven, tmp_path):
    data, mark = small_uneven.prepare.output_path, f"hog-kill-{os.getpid()}"
    proc = _cli_train(tmp_path / "run", data, *HOGWILD, "--set", "train.epochs=10000", wait=False,
                      env={"DLP_TEST_MARK": mark})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").exists():
            time.sleep(0.2)  # the first step record: the workers are training
        workers = [p for p in _processes_marked(mark) if p != proc.pid and b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]
        assert len(workers) == 2, workers
        t0 = time.time()
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert time.time() - t0 < 30
    finally:
        proc.kill()
    assert proc.returncode not in (0, None)
    assert re.search(r"hogwild worker \d of rank 0 died \(exit code -9\)", err), err[-2000:]


class _Trap:
    """Unpickling this creates ``path``: proof that loading ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_booby_trapped_checkpoint_is_refused_and_runs_nothing(small_uneven, tmp_path):
    import pickle

    from safetensors.torch import save_file

    data = small_uneven.prepare.output_path
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    proof = tmp_path / "code-ran"
    (ckpt / "latest.pt").write_bytes(pickle.dumps(_Trap(str(proof))))
    out = _cli_train(tmp_path / "run", data, "--resume")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "latest.pt: a pickle checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert not proof.exists()
    # the same bytes under our own name, and a safetensors file that is not ours: refused too
    (ckpt / "latest.pt").unlink()
    (ckpt / "latest.safetensors").write_bytes(pickle.dumps(_Trap(str(proof))))
    cfg = replace(small_uneven, train={"launcher": "local", "resume": True, "run_dir": str(tmp_path / "run")})
    with pytest.raises(UserError, match=r"latest\.safetensors: not a dl_pipeline checkpoint"):
        train_model(cfg)
    save_file({"model.fc.weight": torch.zeros(4, 32)}, str(ckpt / "latest.safetensors"))
    with pytest.raises(UserError, match=r"latest\.safetensors: not a dl_pipeline checkpoint"):
        train_model(cfg)
    assert not proof.exists()


def test_bundle_loads_in_fresh_process_and_predicts_identically(ag_model):
    from dl_pipeline.bundle import load_bundle
    from dl_pipeline.scoring import predict_texts

    cfg, metrics = ag_model
    bundle_dir = os.path.join(cfg.train.run_dir, "model")
    assert sorted(os.listdir(bundle_dir)) == ["featurizer.json", "labels.json", "metrics.json", "model.json",
                                              "model.safetensors", "versions.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(bundle_dir).st_mode & 0o777 == 0o755 & ~umask  # a scoring job under another account reads it
    assert {os.stat(os.path.join(bundle_dir, f)).st_mode & 0o777 for f in os.listdir(bundle_dir)} == {0o644 & ~umask}
    texts = ["Stocks rally as oil falls", "Team wins the championship final", "New chip doubles battery life"]
    here = predict_texts(load_bundle(bundle_dir), texts, batch_size=2)
    code = (
        "import json,sys; from dl_pipeline.bundle import load_bundle; from dl_pipeline.scoring import predict_texts;"
        f"p=predict_texts(load_bundle({bundle_dir!r}), {texts!r}, 2);"
        "print(json.dumps({'i': p['index'].tolist(), 'p': p['probability'].tolist()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there["i"] == here["index"].tolist()
    assert there["p"] == pytest.approx(here["probability"].tolist(), abs=1e-7)
    assert metrics["test"]["rows"] == 7600 and metrics["test"]["accuracy"] > 0.75
    run = cfg.train.run_dir
    assert os.path.getsize(os.path.join(run, "learning_curve.png")) > 1000
    assert os.path.getsize(os.path.join(run, "confusion_matrix.png")) > 1000


def test_training_user_errors(small_uneven, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"format": "dl_pipeline.prepared/1"}))
    with pytest.raises(UserError, match=r"format 'dl_pipeline.prepared/1'.*re-run `dl-pipeline prepare`"):
        train_model(replace(small_uneven, train={"launcher": "local", "data_path": str(tmp_path / "old")}))
    with pytest.raises(UserError, match="has no 'chars' feature"):
        train_model(replace(small_uneven, model={"name": "char_cnn"}, train={"launcher": "local"}))
    with pytest.raises(UserError, match=r"world size 8 > 3 row groups"):
        train_model(replace(small_uneven, train={"launcher": SPARK_LAUNCHER, "num_proc": 8}))
    if not HAS_HOROVOD:  # the Spark 4 stack: the Horovod launchers name the one that works
        with pytest.raises(UserError, match=r"train.launcher=spark needs Horovod.*set train.launcher=torch_distributor$"):
            train_model(replace(small_uneven, train={"launcher": "spark"}))
    with pytest.raises(UserError, match=r"1 rank\(s\) x 4 Hogwild workers > 3 row groups"):  # would wait for a row group
        train_model(replace(small_uneven, train={"launcher": "local", "mode": "hogwild"}, hogwild={"workers": 4}))
    with pytest.raises(UserError, match=r"train.log_every_steps must be >= 1"):
        replace(small_uneven, train={"log_every_steps": 0})
    from dl_pipeline.train.driver import _world_size

    hosts = replace(small_uneven, train={"launcher": "horovodrun", "num_proc": 0}, horovod={"hosts": "a:2,b:3"})
    assert _world_size(hosts, None) == 5  # the hosts' slots, not this machine's cores
    with pytest.raises(UserError, match=r"train.run_dir=s3a://bucket/run: must be a local or mounted path"):
        train_model(replace(small_uneven, train={"launcher": "local", "run_dir": "s3a://bucket/run"}))
    with pytest.raises(UserError, match="no manifest.json here"):
        train_model(replace(small_uneven, train={"launcher": "local", "data_path": "/nonexistent"}))
    with pytest.raises(UserError, match=r"loss became (nan|inf) at step \d+"):
        train_model(replace(small_uneven, train={"launcher": "local", "optimizer": "sgd", "lr": 1e30, "epochs": 1}))


@pytest.mark.parametrize("name, batch", [
    ("fasttext", {"tokens": torch.randint(0, 50, (3, 7))}),
    ("lstm", {"tokens": torch.randint(1, 50, (3, 7)), "words": torch.tensor([4, 0, 7], dtype=torch.int32)}),
    ("char_cnn", {"chars": torch.randint(0, 70, (3, 1014))}),
    ("cnn", {"image": torch.randint(0, 255, (3, 28, 28, 1), dtype=torch.uint8)}),
])
def test_model_shapes(name, batch):
    from dl_pipeline.config import DataConfig, FeaturesConfig
    from dl_pipeline.features import image_spec, text_spec
    from dl_pipeline.models import build_model, model_spec

    feat = image_spec(DataConfig()) if name == "cnn" else text_spec(FeaturesConfig(hash_buckets=50), DataConfig())
    model = build_model(model_spec(name, feat, 5, 8, "small", 0.5)).eval()
    assert model(batch).shape == (3, 5)


def test_mlflow_logs_params_metrics_and_bundle_when_configured(small_uneven, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a DB; a file store is enough here

    uri = f"file://{tmp_path}/mlruns"
    train_model(replace(small_uneven, train={"launcher": "local", "epochs": 2, "run_dir": str(tmp_path / "run"),
                                             "mlflow_tracking_uri": uri, "mlflow_experiment": "dlp-test"}))
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("dlp-test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["model.name"] == "fasttext" and run.data.params["train.epochs"] == "2"
    assert run.data.params["train.label_smoothing"] == "-1.0" and run.data.params["resolved.label_smoothing"] == "0.1"
    assert 0 < run.data.metrics["final_test_accuracy"] <= 1 and "final_val_loss" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
    assert len(client.get_metric_history(run.info.run_id, "data_wait_fraction_per_rank_rank0")) == 2
    record = json.load(open(tmp_path / "run" / "mlflow.json"))  # the bundle, logged as a pyfunc model from code
    assert record["run_id"] == run.info.run_id and record["registered_version"] is None
    import pandas as pd

    model = mlflow.pyfunc.load_model(record["model_uri"])
    out = model.predict(pd.DataFrame({"title": ["Stocks rally", None], "text": ["Shares rose on Wall Street.", None]}))
    assert list(out.columns) == ["prediction", "label_name", "probability", "reason"]
    assert out["reason"].tolist() == ["", "empty_text"] and 1 <= int(out["prediction"][0]) <= 4


def test_mixed_adam_equals_adam_on_dense_and_sparse_adam_on_sparse():
    from dl_pipeline.train.optim import MixedAdam

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ref, mixed = torch.optim.Adam([a], lr=0.01), MixedAdam([b], lr=0.01)
    for _ in range(5):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        mixed.step()
    assert torch.allclose(a, b, atol=1e-6)
    e1 = torch.nn.EmbeddingBag(10, 4, sparse=True)
    e2 = torch.nn.EmbeddingBag(10, 4, sparse=True)
    e2.load_state_dict(e1.state_dict())
    ref, mixed = torch.optim.SparseAdam(e1.parameters(), lr=0.01), MixedAdam(e2.parameters(), lr=0.01)
    for _ in range(5):
        x = torch.randint(0, 10, (3, 4))
        for emb, opt in ((e1, ref), (e2, mixed)):
            opt.zero_grad()
            emb(x).sum().backward()
            opt.step()
    assert torch.allclose(e1.weight, e2.weight, atol=1e-6)


def test_fasttext_training_step_equals_torchs_own_sparse_backward():
    """The fast path (distinct ids made by the data thread, models._BagMean's coalesced gradient,
    no padding_idx) must train exactly like torch's own sparse EmbeddingBag backward over the
    padded rows, with the same optimizer."""
    import numpy as np
    from torch.nn import functional as F

    from dl_pipeline.models import FastText, bag_inputs
    from dl_pipeline.train.optim import MixedAdam

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    fast, ref = FastText(50, 8, 3, sparse=True), FastText(50, 8, 3, sparse=True)
    ref.load_state_dict(fast.state_dict())
    opt_fast, opt_ref = MixedAdam(fast.parameters(), lr=0.05), MixedAdam(ref.parameters(), lr=0.05)
    for _ in range(6):
        length = rng.integers(0, 12, 6).astype(np.int32)
        length[0] = 0  # an empty row: its bag is zeros, it adds no gradient
        tokens = (rng.integers(1, 51, (6, 12)) * (np.arange(12) < length[:, None])).astype(np.int32)
        y = torch.from_numpy(rng.integers(0, 3, 6))
        batch = {k: torch.from_numpy(v) for k, v in bag_inputs(tokens, length, distinct=True).items()}
        rows = batch["token_rows"]  # distinct, ascending; every id's row lists its bag
        assert torch.equal(rows, torch.unique(batch["token_ids"].long()))
        for u, start in enumerate(batch["token_row_offsets"].tolist()):
            end = batch["token_row_offsets"][u + 1] if u + 1 < len(rows) else len(batch["token_ids"])
            bags = batch["token_row_bags"][start:end]
            want = [b for b in range(6) for i in range(length[b]) if tokens[b, i] == rows[u]]
            assert bags.tolist() == want
        opt_fast.zero_grad()
        F.cross_entropy(fast(batch), y).backward()
        opt_fast.step()
        opt_ref.zero_grad()
        F.cross_entropy(ref.fc(ref.embedding(torch.from_numpy(tokens).long())), y).backward()  # padding_idx 0
        opt_ref.step()
    assert fast.embedding.weight.grad._indices().shape[1] == len(batch["token_rows"])  # coalesced
    for a, b in zip(fast.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def _two_class_csv(path, rows=400):
    """AG News test rows of classes 1 and 2 (World, Sports) as a new 2-class dataset."""
    import csv
    import gzip

    from conftest import AG_TEST

    with gzip.open(AG_TEST, "rt", encoding="utf-8", newline="") as fh:
        picked = [r for r in csv.reader(fh) if r[0] in ("1", "2")][:rows]
    with gzip.open(path, "wt", encoding="utf-8", newline="") as out:
        csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(picked)
    return path


def test_transfer_warm_start_replaces_head_and_keeps_frozen_embedding_exact(spark, ag_model, tmp_path):
    from safetensors.torch import load_file

    from conftest import demo_config
    from dl_pipeline.bundle import load_bundle
    from dl_pipeline.config import replace
    from dl_pipeline.prepare import prepare_dataset
    from dl_pipeline.train.driver import train_model

    source = os.path.join(ag_model[0].train.run_dir, "model")
    cfg = demo_config(tmp_path, f"data.train_path={_two_class_csv(tmp_path / 'two.csv.gz')}", "data.test_path=",
                      "data.num_classes=2", "data.label_names=[World,Sports]", "shard.test_fraction=0.2")
    prepare_dataset(spark, cfg)
    cfg = replace(cfg, train={"launcher": "local", "epochs": 2, "init_from": source, "freeze": ("embedding",),
                              "body_lr_factor": 0.5})
    metrics = train_model(cfg)
    before = load_file(os.path.join(source, "model.safetensors"))
    after = load_file(os.path.join(cfg.train.run_dir, "model", "model.safetensors"))
    assert torch.equal(before["embedding.weight"], after["embedding.weight"])  # frozen: exactly unchanged
    assert before["fc.weight"].shape[0] == 4 and after["fc.weight"].shape[0] == 2  # a new head for 2 classes
    bundle = load_bundle(os.path.join(cfg.train.run_dir, "model"))
    origin = bundle.metrics["init_from"]
    assert origin["bundle"] == source and origin["head"] == "new" and origin["freeze"] == ["embedding"]
    assert origin["model_version"] == load_bundle(source).version
    assert metrics["test"]["accuracy"] > 0.6  # the pre-trained embedding separates World from Sports


def test_transfer_featurizer_mismatch_is_one_line_exit_2(ag_model, tmp_path):
    import shutil

    cfg = ag_model[0]
    bundle = tmp_path / "bundle"
    shutil.copytree(os.path.join(cfg.train.run_dir, "model"), bundle)
    feat = json.loads((bundle / "featurizer.json").read_text())
    feat["tokens"]["buckets"] = 4096
    (bundle / "featurizer.json").write_text(json.dumps(feat))
    out = subprocess.run([sys.executable, "-m", "dl_pipeline.cli", "train", "--set", f"train.data_path={cfg.train.data_path}",
                          "--set", f"train.run_dir={tmp_path}/run", "--set", "train.launcher=local",
                          "--set", f"train.init_from={bundle}"], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "featurizer differs at tokens.buckets (bundle 4096" in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_resident_shard_batches_are_the_padded_rows_real_ids():
    """ResidentShard.take gives each row's real ids end to end, as bag_inputs does from the
    padded rows; an epoch is whole permutations, and a resumed epoch (skip) is its tail."""
    import numpy as np

    from dl_pipeline.models import bag_inputs
    from dl_pipeline.train.data import ResidentShard

    rng = np.random.default_rng(3)
    length = rng.integers(1, 9, 50).astype(np.int32)
    tokens = np.where(np.arange(8) < length[:, None], rng.integers(1, 1000, (50, 8)), 0).astype(np.int32)
    label = np.arange(50, dtype=np.int32)
    held = ResidentShard({"label": label, "tokens": tokens, "length": length})
    idx = rng.permutation(50)[:17]
    got, want = held.take(idx), bag_inputs(tokens[idx], length[idx])
    assert np.array_equal(got["label"], label[idx])
    assert np.array_equal(got["token_ids"], want["token_ids"]) and np.array_equal(got["token_offsets"], want["token_offsets"])
    batches = list(held.epoch_batches(np.random.default_rng(5), 16, 7))  # 112 rows: 2 permutations and a bit
    seen = np.concatenate([b["label"] for b in batches])
    assert len(seen) == 112 and sorted(seen[:50]) == list(range(50))
    assert len(set(seen[:96].tolist())) == 50
    tail = list(held.epoch_batches(np.random.default_rng(5), 16, 7, skip=4))
    assert len(tail) == 3 and all(np.array_equal(a["label"], b["label"]) for a, b in zip(batches[4:], tail, strict=True))
    assert np.array_equal(np.concatenate([b["label"] for b in held.ordered_batches(16)]), label)


@pytest.mark.parametrize("buckets", [60_000, 1 << 17, 1 << 20])
def test_bag_groups_match_a_sort_of_the_ids(buckets):
    """models.bag_groups (radix passes, a partition on the 17th bit) equals a plain stable sort."""
    import numpy as np

    from dl_pipeline.models import bag_groups

    rng = np.random.default_rng(buckets)
    lengths = rng.integers(0, 300, 64)
    ids = rng.integers(1, buckets + 1, int(lengths.sum())).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int32)
    got = bag_groups(ids, offsets)
    order = np.argsort(ids, kind="stable")
    rows, starts = np.unique(ids[order], return_index=True)
    assert np.array_equal(got["token_rows"], rows) and np.array_equal(got["token_row_offsets"], starts)
    assert np.array_equal(got["token_row_bags"], np.repeat(np.arange(64), lengths)[order])


@pytest.mark.parametrize("launcher", [pytest.param("spark", marks=requires_horovod), "torch_distributor"])
def test_lstm_trains_on_two_ranks_and_its_bundle_predicts_identically_elsewhere(spark, small_uneven, tmp_path, launcher):
    """model.name=lstm: a few steps on 2 Horovod or torch.distributed ranks (sparse embedding
    gradients allgathered),
    the no-pickle bundle reloaded in a fresh process predicts the same; the sequence it reads is
    the rows' unigrams in order, nothing after them."""
    import numpy as np

    from dl_pipeline.bundle import load_bundle
    from dl_pipeline.models import sequence_inputs
    from dl_pipeline.scoring import predict_texts

    run = tmp_path / "lstm"
    cfg = replace(small_uneven, model={"name": "lstm", "lstm_hidden": 16},
                  train={"launcher": launcher, "num_proc": 2, "epochs": 1, "steps_per_epoch": 8, "batch_size": 16,
                         "run_dir": str(run)})
    metrics = train_model(cfg, spark=spark)
    assert metrics["world_size"] == 2 and metrics["global_step"] == 8 and metrics["test"]["rows"] > 0
    bundle_dir = str(run / "model")
    bundle = load_bundle(bundle_dir)
    assert bundle.model_spec["name"] == "lstm" and bundle.model_spec["bidirectional"] is True
    texts = ["Stocks rally as oil falls", "Team wins the championship final", "", "New chip doubles battery life"]
    here = predict_texts(bundle, texts, batch_size=3)
    code = (
        "import json; from dl_pipeline.bundle import load_bundle; from dl_pipeline.scoring import predict_texts;"
        f"p=predict_texts(load_bundle({bundle_dir!r}), {texts!r}, 3);"
        "print(json.dumps({'i': p['index'].tolist(), 'p': p['probability'].tolist()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there["i"] == here["index"].tolist()
    assert there["p"] == pytest.approx(here["probability"].tolist(), abs=1e-7)
    tokens = np.array([[5, 6, 7, 56, 67], [9, 8, 98, 0, 0], [0, 0, 0, 0, 0]], dtype=np.int32)  # unigrams, bigrams
    seq = sequence_inputs(tokens, np.array([3, 2, 0], dtype=np.int32))
    assert seq["seq"].tolist() == [[5, 6, 7], [9, 8, 0], [0, 0, 0]] and seq["seq_length"].tolist() == [3, 2, 1]


@pytest.mark.parametrize("launcher, code", [pytest.param("spark", 137, marks=requires_horovod), ("torch_distributor", -9)])
def test_a_killed_rank_fails_the_job_fast_and_max_restarts_resumes_it(spark, small_uneven, tmp_path, monkeypatch, caplog,
                                                                      launcher, code):
    """horovod.spark.run or TorchDistributor, 2 ranks: rank 1 SIGKILLs itself at step 30
    (checkpoints at 25 and 40). Without restarts the job fails within seconds naming the last
    checkpoint; with train.max_restarts=1 the ranks are relaunched from it and the run completes."""
    from dl_pipeline.errors import PipelineError

    monkeypatch.setenv("DL_PIPELINE_FAIL_AT_STEP", "30")
    base = {"launcher": launcher, "num_proc": 2, "epochs": 2, "steps_per_epoch": 40, "batch_size": 16,
            "checkpoint_every_steps": 25}
    t0 = time.monotonic()
    with pytest.raises(PipelineError, match=rf"training failed \(rank 1 died \(exit code {code}: SIGKILL\)\); last checkpoint: "
                                            r"step 25 \(epoch 0\) in .*latest.safetensors; continue with --resume"):
        train_model(replace(small_uneven, train={**base, "run_dir": str(tmp_path / "once")}), spark=spark)
    assert time.monotonic() - t0 < 60
    with caplog.at_level("WARNING", logger="dl_pipeline.train.driver"):
        metrics = train_model(replace(small_uneven, train={**base, "max_restarts": 1, "run_dir": str(tmp_path / "again")}),
                              spark=spark)
    assert "restart 1 of 1 from the last checkpoint: step 25" in caplog.text
    assert metrics["global_step"] == 80 and metrics["epochs_run"] == 2


@requires_horovod
def test_a_killed_rank_under_horovodrun_is_named_in_one_line(small_uneven, tmp_path, monkeypatch):
    from dl_pipeline.errors import PipelineError

    monkeypatch.setenv("DL_PIPELINE_FAIL_AT_STEP", "30")
    cfg = replace(small_uneven, train={"launcher": "horovodrun", "num_proc": 2, "epochs": 2, "steps_per_epoch": 40,
                                       "batch_size": 16, "checkpoint_every_steps": 25, "run_dir": str(tmp_path / "run")})
    t0 = time.monotonic()
    with pytest.raises(PipelineError, match=r"training failed \(rank 1 died \(exit code 137: SIGKILL\)\); last checkpoint: step 25"):
        train_model(cfg)
    assert time.monotonic() - t0 < 60


@requires_petastorm
def test_arrow_reader_deals_and_reads_the_row_groups_as_petastorm_does(small_uneven):
    """The pyarrow reader (stacks without Petastorm) gives each of 2 shards the same row groups
    in the same order as Petastorm, ordered or shuffled over several passes: training is the
    same whichever reads."""
    import numpy as np

    from dl_pipeline import dataset
    from dl_pipeline.train.data import row_groups

    url = dataset.split_url(small_uneven.prepare.output_path, "train")
    shapes = {"tokens": [256], "length": [], "label": []}
    for shard in range(2):
        for shuffle, seed, epochs in ((False, 0, 1), (True, 11, 3)):
            got = {}
            for reader in ("arrow", "petastorm"):
                with row_groups(url, ["label", "tokens", "length"], shapes, shard, 2, epochs=epochs, seed=seed,
                                shuffle=shuffle, workers=1, reader=reader) as groups:
                    got[reader] = list(groups)
            assert len(got["arrow"]) == len(got["petastorm"]) == epochs * (2 if shard == 0 else 1)
            for a, p in zip(got["arrow"], got["petastorm"], strict=True):
                assert all(np.array_equal(a[c], p[c]) for c in ("label", "tokens", "length"))


_AVERAGE_RANK = r"""
import json, os, sys
import torch
rank = int(sys.argv[1])
os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
from dl_pipeline.train.comm import TorchComm

torch.manual_seed(0)
model = torch.nn.ModuleDict({"emb": torch.nn.EmbeddingBag(10, 2, mode="sum", sparse=True),
                             "fc": torch.nn.Linear(2, 1), "extra": torch.nn.Linear(2, 1)})
comm = TorchComm(cuda=False)
opt = comm.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), model, False)
ids = torch.tensor([[1, 2, 3], [3, 4, 5]][rank])
h = model["emb"](ids, torch.tensor([0]))
loss = model["fc"](h).sum() + (model["extra"](h).sum() if rank == 0 else 0)  # rank 1 never reaches "extra"
loss.backward()
local = {n: (p.grad.to_dense() if p.grad is not None else torch.zeros_like(p)).tolist() for n, p in model.named_parameters()}
opt.average_gradients()
averaged = {n: p.grad.to_dense().tolist() for n, p in model.named_parameters()}
print(json.dumps({"local": local, "averaged": averaged}), flush=True)
comm.conclude(None)
# What is under test ends here. torch 2.13's Gloo teardown at interpreter exit sometimes aborts
# ("terminate called without an active exception", seen once in CI): not this test's subject.
os._exit(0)
"""


def test_torch_comm_averages_dense_and_sparse_gradients_even_where_a_rank_has_none(tmp_path):
    """Two real torch.distributed (Gloo) processes: the sparse embedding gradient (different rows
    per rank) and the dense ones are averaged over the ranks; a parameter one rank's step did not
    reach counts as zeros there, and neither rank hangs."""
    import numpy as np

    script = tmp_path / "average.py"
    script.write_text(_AVERAGE_RANK)
    with socket_port() as port:
        procs = [subprocess.Popen([sys.executable, str(script), str(r), str(port)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for name in outs[0]["local"]:
        want = (np.array(outs[0]["local"][name]) + np.array(outs[1]["local"][name])) / 2
        assert np.allclose(outs[0]["averaged"][name], want) and np.allclose(outs[1]["averaged"][name], want), name
    assert not np.allclose(outs[0]["local"]["extra.weight"], 0)  # the case under test: only rank 0 had it


@contextlib.contextmanager
def socket_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


def test_recipe_label_smoothing_and_patience_reach_the_ranks_and_the_loss(small_uneven):
    """The driver hands the ranks the recipe's smoothing and patience; the loop trains on the
    smoothed loss (a model already sure of every label still has loss > 0)."""
    import math

    from dl_pipeline.train.driver import rank_spec
    from dl_pipeline.train.loop import train_one_epoch

    spec = rank_spec(small_uneven, 1)
    assert spec.label_smoothing == 0.1
    assert spec.early_stopping_patience == max(3, math.ceil(500 / spec.steps_per_epoch))
    mine = rank_spec(replace(small_uneven, train={"label_smoothing": 0.0, "early_stopping_patience": 2}), 1)
    assert (mine.label_smoothing, mine.early_stopping_patience) == (0.0, 2)

    class Sure(torch.nn.Module):  # logits 50 for the true label: plain cross-entropy ~0
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, batch):
            return torch.nn.functional.one_hot(batch["label"].long(), 4).float() * 50 + self.w

    batches = iter([{"label": torch.tensor([0, 1, 2, 3])}] * 2)
    losses = [train_one_epoch(Sure(), torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=0.0), batches, 1, 0,
                              lambda step: 0.0, torch.device("cpu"), label_smoothing=ls)["loss_sum"] / 4 for ls in (0.0, 0.1)]
    assert losses[0] < 1e-6 and losses[1] > 1.0  # 0.1 x 3/4 of the mass on labels 50 logits below


def test_resume_under_another_plan_is_one_line(small_uneven, tmp_path):
    """A checkpoint resumes only under the plan it was cut by (steps per epoch, epochs, batch,
    ranks): the recipe sizes them from the data, so a silent change would move the LR schedule."""
    base = {"launcher": "local", "epochs": 1, "steps_per_epoch": 5, "run_dir": str(tmp_path / "run"), "progress": False}
    train_model(replace(small_uneven, train=base))
    with pytest.raises(UserError, match=r"written by a run with epochs 1, this run has 2: .*--set train.epochs=1"):
        train_model(replace(small_uneven, train={**base, "epochs": 2, "resume": True}))
    assert train_model(replace(small_uneven, train={**base, "resume": True}))["epochs_run"] == 1  # the same plan resumes
