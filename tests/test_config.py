import os
import subprocess
import sys

import pytest

from dl_pipeline.config import Config, load_config, replace
from dl_pipeline.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_and_yaml_diff_and_overrides(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 7\n  lr: 1\ndata:\n  text_columns: body\n")
    cfg = load_config(path, ["train.batch_size=16", "model.name=char_cnn", "spark.conf.spark.sql.shuffle.partitions=3"])
    assert cfg.train.epochs == 7
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # int widened to float
    assert cfg.train.batch_size == 16
    assert cfg.model.name == "char_cnn"
    assert cfg.data.text_columns == ("body",)
    assert cfg.spark.conf == {"spark.sql.shuffle.partitions": "3"}
    assert cfg.shard == Config().shard  # untouched sections keep defaults


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.epochs=three"], "train.epochs: expected int, got 'three'"),
        (["train.bogus=1"], "unknown key train.bogus"),
        (["nosuch.key=1"], "unknown section 'nosuch'"),
        (["train.epochs"], "expected section.key=value"),
        (["train.epochs=-1"], "train.epochs must be >= 0"),
        (["train.launcher=mpi"], "train.launcher='mpi': must be one of spark, horovodrun, torch_distributor, local"),
        (["train.resume=maybe"], "train.resume: expected bool"),
        (["shard.val_fraction=0.6", "shard.test_fraction=0.5"], "shard.val_fraction + shard.test_fraction must be < 1"),
        (["shard.row_group_mb=4096"], "shard.row_group_mb must be in 1..1024"),
        (["features.hash_buckets=4294967296"], r"features.hash_buckets must be in 1..2147483647"),
        (["features.token_hash=md5"], "features.token_hash='md5': must be one of word64, crc32"),
        (["data.num_fields=5"], "data.num_fields=5"),
        (["data.label_names=[a,b]", "data.num_classes=3"], "data.label_names has 2 names but data.num_classes=3"),
    ],
)
def test_override_errors(overrides, message):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(UserError, match="config file .*missing.yaml not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match=r"c.yaml line \d+: not valid YAML"):
        load_config(write(tmp_path, "train:\n  epochs: [1\n"))
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(UserError, match="section 'train' must be a mapping"):
        load_config(write(tmp_path, "train: 3\n"))
    with pytest.raises(UserError, match=r"config file .*: unknown key model.layers"):
        load_config(write(tmp_path, "model:\n  layers: 3\n"))


def test_every_shipped_config_loads():
    confs = sorted(f for f in os.listdir(os.path.join(ROOT, "conf")) if f.endswith(".yaml"))
    assert {"ag_news.yaml", "dbpedia.yaml", "yelp_polarity.yaml", "amazon_polarity.yaml", "fashion_mnist.yaml", "demo.yaml"} <= set(confs)
    for name in confs:
        cfg = load_config(os.path.join(ROOT, "conf", name))
        assert cfg.data.train_path, name


def test_dataset_configs_hold_only_data_facts():
    """A dataset's config says where its rows are and what they mean; how to train comes from
    the model's recipe (train/recipes.py), so a new dataset gets the same untuned defaults."""
    import yaml

    allowed_train = {"data_path", "run_dir"}
    for name in sorted(os.listdir(os.path.join(ROOT, "conf"))):
        if not name.endswith(".yaml") or name == "demo.yaml":  # the demo trades epochs for a fast first run
            continue
        with open(os.path.join(ROOT, "conf", name)) as fh:
            doc = yaml.safe_load(fh)
        assert set(doc.get("train", {})) <= allowed_train, (name, doc["train"])
        assert set(doc.get("model", {})) <= {"name"}, (name, doc["model"])  # images need an image model


def test_recipe_batch_lr_and_epochs_follow_the_data_size():
    from dl_pipeline.train.recipes import batch_for, resolve

    assert batch_for(256, 100_000, 128) == 256
    assert batch_for(256, 4_933, 128) == 32  # AG News sample over 2 ranks: 154 steps an epoch
    assert batch_for(256, 96, 128) == 16  # never below MIN_BATCH
    r = resolve("fasttext", Config().train, 96)
    assert (r.batch_size, r.steps_per_epoch) == (16, 6)
    # the LR per sample stays the recipe's; epochs and patience grow until the run has enough steps
    assert r.lr == 0.02 * 16 / 256 and r.epochs == 300 and r.patience == 84 and r.label_smoothing == 0.1
    big = resolve("fasttext", Config().train, 100_000)
    assert (big.batch_size, big.lr, big.epochs, big.patience) == (256, 0.02, 10, 3)
    user = resolve("fasttext", replace(Config(), train={"batch_size": 512, "epochs": 3, "lr": 0.1,
                                                        "early_stopping_patience": 0, "label_smoothing": 0.0}).train, 96)
    assert (user.batch_size, user.epochs, user.lr, user.patience, user.label_smoothing) == (512, 3, 0.1, 0, 0.0)
    assert resolve("cnn", Config().train, 96).lr == 0.001  # the rule is fastText's: the CNNs keep their LR
    assert resolve("fasttext", replace(Config(), train={"batch_size": 2048}).train, 96).lr == 0.02  # a set batch keeps it


def test_replace_and_json_roundtrip():
    from dl_pipeline.config import config_from_dict

    cfg = replace(Config(), train={"epochs": 2}, score={"id_columns": ["id"]})
    assert cfg.train.epochs == 2 and cfg.score.id_columns == ("id",)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "args, needle",
    [
        (["prepare", "--config", "/nonexistent.yaml"], "error: config file /nonexistent.yaml not found"),
        (["train", "--set", "train.epochs=x"], "error: --set: train.epochs: expected int"),
        (["score", "--set", "score.nope=1"], "error: --set: unknown key score.nope"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["score", "--run-date", "22/11/2026", "--set", "score.model_path=/m", "--set", "score.input_path=/i",
          "--set", "score.output_path=/o"], "score.run_date='22/11/2026': expected YYYY-MM-DD"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(args, needle):
    proc = subprocess.run([sys.executable, "-m", "dl_pipeline.cli", *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]) == 1
