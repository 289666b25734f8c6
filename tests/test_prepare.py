import csv
import glob
import gzip
import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import AG_TEST, AG_TRAIN, SAMPLE, paused_pids, published, read_split, shard_digests
from dl_pipeline.config import load_config
from dl_pipeline.errors import UserError
from dl_pipeline.prepare import prepare_dataset

BIG = "a" * (1 << 20)
# (line bytes, expected outcome); line numbers are 1-based physical lines.
BAD_LINES = [
    (b'"1","Good one","first fine row about world politics"', "ok"),
    (b'"2","Good two","second fine row about sports"\r', "ok"),  # Windows line ending
    (b'"2","only two"', "wrong_field_count"),
    (b'"3","a","b","extra"', "wrong_field_count"),
    (b'"x","t","bad label"', "label_not_integer"),
    (b'"9","t","out of range"', "label_out_of_range"),
    (b'"0","t","zero is out too"', "label_out_of_range"),
    (b'"1","",""', "empty_text"),
    (b'"1","<br>","  \\n  "', "empty_text"),
    (b'"1","bad","bytes \xff\xfe here"', "invalid_utf8"),
    (b'"1","same","text here"', "conflicting_labels"),
    (b'"2","same","text here"', "conflicting_labels"),
    (b'"3","dup","row again"', "ok"),
    (b'"3","dup","row again"', "duplicate"),
    (b'"4","big","' + BIG.encode() + b'"', "text_too_long"),
    (b'"2","nul","has \x00 nul byte"', "ok"),
    (b'"1","bro"ken","x"', "malformed_quoting"),
    (b'"2","t","unterminated', "malformed_quoting"),
    (b"", None),  # a blank line is not a record
    (b"   ", None),  # nor is one of spaces
    (b' "1","lead","space before the quote"', "label_not_integer"),  # starts like a blank line
    (b'"4","Good three","third fine row about science"', "ok"),
    (b'"3","Good four","business news row"', "ok"),
]


def _config(tmp, *overrides):
    return load_config(None, [
        f"prepare.output_path={tmp}/out", "data.num_classes=4", "shard.max_workers=1",
        "shard.row_groups_per_worker=2", *overrides,
    ])


@pytest.fixture(scope="module")
def bad_run(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    path = tmp / "bad.csv"
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    cfg = _config(tmp, f"data.train_path={path}", "shard.val_fraction=0")
    return tmp, prepare_dataset(spark, cfg)


def test_every_bad_row_is_accounted_for_by_reason(bad_run):
    _, manifest = bad_run
    outcomes = [o for _, o in BAD_LINES if o is not None]
    expected_reasons = {}
    for o in outcomes:
        if o not in ("ok", "duplicate"):
            expected_reasons[o] = expected_reasons.get(o, 0) + 1
    c = manifest["counts"]
    assert c["input_rows"] == len(outcomes) == 21
    assert c["clean_rows"] == outcomes.count("ok") == 6
    assert c["duplicate_rows"] == 1
    assert c["rejected_rows"] == 14
    assert manifest["rejects_by_reason"] == expected_reasons
    assert c["input_rows"] == c["clean_rows"] + c["rejected_rows"] + c["duplicate_rows"]
    assert c["splits"] == {"train": 6, "val": 0, "test": 0}


def test_manifest_records_each_input_checksum(bad_run, tmp_path):
    """The inputs' sizes and SHA-256, computed beside the passes; a failed run stops the reading."""
    import threading

    from dl_pipeline import fsutil

    tmp, manifest = bad_run
    data = (tmp / "bad.csv").read_bytes()
    assert manifest["inputs"] == [{"key": "data.train_path", "url": f"file://{tmp}/bad.csv", "bytes": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest()}]
    assert manifest["timings"]["checksum_inputs_s"] >= 0
    assert manifest["row_rules"] == "dl_pipeline.rows/2"  # which val/train split a row lands in
    stopped = threading.Event()
    stopped.set()
    with pytest.raises(InterruptedError):
        fsutil.sha256_and_size(f"file://{tmp}/bad.csv", stopped)


def test_rejects_table_names_file_row_and_reason(bad_run):
    tmp, _ = bad_run
    rejects = pq.read_table(os.path.join(published(tmp / "out"), "rejects")).to_pandas()
    got = sorted(zip(rejects["row_number"], rejects["reason"], strict=False))
    expected = sorted((i, o) for i, (_, o) in enumerate(BAD_LINES, start=1) if o not in ("ok", None))
    assert got == expected
    assert all(f.endswith("bad.csv") for f in rejects["source_file"])
    big = rejects[rejects["reason"] == "text_too_long"]["raw"].iloc[0]
    assert len(big) == 4096 and big.startswith('"4","big","aaa')
    assert rejects[rejects["row_number"] == 3]["raw"].iloc[0] == '"2","only two"'


def test_petastorm_rows_hold_features_of_clean_rows(bad_run):
    tmp, manifest = bad_run
    rows = read_split(tmp / "out", "train")
    assert len(rows["label"]) == 6
    assert sorted(rows["label"].tolist()) == [0, 1, 1, 2, 2, 3]
    assert rows["chars"].shape == (6, 1014) and rows["tokens"].shape == (6, 256) and (rows["length"] > 0).all()
    # real ids first, then 0 padding: exactly ``length`` non-zero ids per row
    assert ((rows["tokens"] != 0).sum(axis=1) == rows["length"]).all()
    train = manifest["splits"]["train"]
    # 6 rows hashed into 2 groups: both used here, one file each, footers match the manifest
    assert train["row_groups"] == 2 and sum(train["rows_per_row_group"]) == 6
    files = sorted(glob.glob(f"{published(tmp / 'out')}/train/*.parquet"))
    assert [os.path.basename(f) for f in files] == train["files"]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == train["rows_per_row_group"]
    assert all(pq.ParquetFile(f).metadata.num_row_groups == 1 for f in files)


def test_shards_are_plain_typed_parquet_that_spark_and_pyarrow_read(spark, ag_prepared):
    """No codec, no pickled schema: any Parquet reader sees typed columns and every row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cfg, manifest = ag_prepared
    root = published(cfg.prepare.output_path)
    assert not glob.glob(f"{root}/*/_common_metadata") and not glob.glob(f"{root}/*/_metadata")
    expected = {"row_id": pa.string(), "label": pa.int32(), "chars": pa.list_(pa.uint8()),
                "tokens": pa.list_(pa.int32()), "length": pa.int32(), "words": pa.int32()}
    for split in ("train", "val", "test"):
        rows = manifest["splits"][split]["rows"]
        table = pq.read_table(f"{root}/{split}")
        assert {f.name: f.type for f in table.schema} == expected and table.num_rows == rows
        tokens = table.column("tokens").combine_chunks()
        assert pc.all(pc.equal(pc.list_value_length(tokens), 256)).as_py()
        df = spark.read.parquet(f"{root}/{split}")
        assert dict(df.dtypes) == {"row_id": "string", "label": "int", "chars": "array<smallint>",  # uint8: Spark has no unsigned byte
                                   "tokens": "array<int>", "length": "int", "words": "int"}
        assert df.count() == rows and df.selectExpr("max(size(tokens))").first()[0] == 256
    assert manifest["schema"]["tokens"] == {"dtype": "int32", "shape": [256]}
    assert manifest["schema"]["chars"] == {"dtype": "uint8", "shape": [1014]}


def test_ag_sample_counts_match_csv_records_and_shards_are_balanced(ag_prepared):
    cfg, manifest = ag_prepared
    records = 0
    for path in (AG_TRAIN, AG_TEST):
        with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
            records += sum(1 for _ in csv.reader(fh))
    c = manifest["counts"]
    assert c["input_rows"] == records == 18029
    assert c["input_rows"] == c["clean_rows"] + c["rejected_rows"] + c["duplicate_rows"]
    assert c["splits"]["test"] == 7600  # the benchmark's test file keeps every row
    assert manifest["splits"]["test"]["per_class"] == [1900, 1900, 1900, 1900]
    train = manifest["splits"]["train"]
    assert train["row_groups"] == cfg.shard.max_workers * cfg.shard.row_groups_per_worker
    # groups are dealt by a content hash: binomial sizes, within 20% of the mean here (~5 sd)
    mean = train["rows"] / train["row_groups"]
    assert all(abs(n - mean) <= 0.2 * mean for n in train["rows_per_row_group"]), train["rows_per_row_group"]

    shards = [read_split(cfg.prepare.output_path, "train", ["row_id", "label"], shard, 2)["row_id"].tolist()
              for shard in range(2)]
    a, b = set(shards[0]), set(shards[1])
    assert not a & b, "shards overlap"
    assert len(a) + len(b) == train["rows"] == len(shards[0]) + len(shards[1])
    assert abs(len(a) - len(b)) <= max(train["rows_per_row_group"])
    # every row group mixes classes
    for f in sorted(glob.glob(f"{published(cfg.prepare.output_path)}/train/*.parquet")):
        assert len(set(pq.read_table(f, columns=["label"]).column("label").to_pylist())) == 4


def test_rerun_gives_byte_identical_shards(spark, ag_prepared, tmp_path):
    from dl_pipeline.config import replace

    cfg, manifest = ag_prepared
    again = prepare_dataset(spark, replace(cfg, prepare={"output_path": str(tmp_path / "again")}))
    first, second = shard_digests(cfg.prepare.output_path), shard_digests(str(tmp_path / "again"))
    assert len(first) >= 3 * 8 and first == second
    assert again["counts"] == manifest["counts"]


def test_spill_tasks_that_write_as_they_go_give_the_same_shards(spark, ag_prepared, tmp_path):
    """A spill task writes its kept rows out whenever it holds spark.dl_pipeline.test.spill_flush_bytes
    of them (in the product: 128 MB, so a whole gzip file never sits in memory): 64 KB here,
    dozens of flushes a task, and the shards are the same bytes."""
    from dl_pipeline.config import replace
    from dl_pipeline.prepare import FLUSH_CONF

    cfg, manifest = ag_prepared
    spark.conf.set(FLUSH_CONF, str(64 << 10))
    try:
        again = prepare_dataset(spark, replace(cfg, prepare={"output_path": str(tmp_path / "flushed")}))
    finally:
        spark.conf.unset(FLUSH_CONF)
    assert again["counts"] == manifest["counts"]
    assert shard_digests(tmp_path / "flushed") == shard_digests(cfg.prepare.output_path)


def test_split_is_stable_when_rows_are_added(spark, tmp_path):
    """A row's split depends on its content hash only: adding rows never moves it."""
    rows = [f'"{1 + i % 4}","title {i}","body number {i} with words"' for i in range(400)]
    small, big = tmp_path / "small.csv", tmp_path / "big.csv"
    small.write_text("\n".join(rows[:200]) + "\n")
    big.write_text("\n".join(rows) + "\n")

    def ids(path, out):
        cfg = _config(tmp_path, f"data.train_path={path}", f"prepare.output_path={out}", "shard.val_fraction=0.3")
        prepare_dataset(spark, cfg)
        return {s: set(pq.read_table(f"{published(out)}/{s}", columns=["row_id"]).column("row_id").to_pylist()) for s in ("train", "val")}

    a, b = ids(small, tmp_path / "a"), ids(big, tmp_path / "b")
    assert a["val"] and a["val"] <= b["val"] and a["train"] <= b["train"]
    # no bad rows: the rejects table is still there, empty, with its columns
    rejects = pq.read_table(os.path.join(published(tmp_path / "b"), "rejects"))
    assert rejects.num_rows == 0 and rejects.column_names == ["origin", "source_file", "row_number", "raw", "reason"]


def _all_digests(root):
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(root) for f in files}


def test_failed_run_leaves_the_previous_output_whole(spark, tmp_path):
    from dl_pipeline.prepare import INJECT_FAILURE_CONF

    rows = [f'"{1 + i % 4}","title {i}","body number {i} with words"' for i in range(400)] + ['"9","bad","label"']
    path = tmp_path / "in.csv"
    path.write_text("\n".join(rows) + "\n")
    cfg = _config(tmp_path, f"data.train_path={path}", "shard.max_workers=4")
    prepare_dataset(spark, cfg)
    out = tmp_path / "out"
    first = published(out)
    manifest, before = (out / "manifest.json").read_bytes(), _all_digests(first)
    assert any(p.startswith("rejects/") for p in before)
    spark.conf.set(INJECT_FAILURE_CONF, "true")  # every task dies after writing one row group
    try:
        with pytest.raises(Exception, match="injected prepare failure"):
            prepare_dataset(spark, cfg)
    finally:
        spark.conf.unset(INJECT_FAILURE_CONF)
    # the failed run wrote in a directory of its own, which nothing names
    assert len(os.listdir(out / "v")) == 2 and (out / "manifest.json").read_bytes() == manifest
    assert _all_digests(first) == before  # shards and rejects untouched
    prepare_dataset(spark, cfg)  # publishes a new directory, removes the failed run's, keeps the previous
    assert sorted(os.listdir(out / "v")) == sorted({os.path.basename(first), os.path.basename(published(out))})
    assert published(out) != first and _all_digests(published(out)) == before
    assert json.load(open(out / "manifest.json"))["previous_root"] == os.path.relpath(first, out)


_RETRY_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
from conftest import demo_config
from dl_pipeline.config import SparkConfig
from dl_pipeline.prepare import INJECT_FAILURE_CONF, prepare_dataset
from dl_pipeline.spark import get_spark
# local[2,2]: two task slots, a failed task is retried once (as on a cluster)
spark = get_spark(SparkConfig(master="local[2,2]", conf={"spark.sql.shuffle.partitions": "4", INJECT_FAILURE_CONF: "true"}))
prepare_dataset(spark, demo_config(sys.argv[2]))
"""


@pytest.mark.slow
def test_retried_tasks_give_the_same_shards(ag_prepared, tmp_path):
    """Every task's first attempt dies after writing a row group; the retries' output is
    byte-identical to a clean run's, with no temporary files left behind."""
    import subprocess
    import sys

    script = tmp_path / "retry.py"
    script.write_text(_RETRY_RUN)
    proc = subprocess.run([sys.executable, str(script), os.path.dirname(os.path.abspath(__file__)), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected prepare failure" in proc.stderr  # the first attempts really failed
    cfg, manifest = ag_prepared
    assert shard_digests(str(tmp_path / "prepared")) == shard_digests(cfg.prepare.output_path)
    again = json.load(open(tmp_path / "prepared" / "manifest.json"))
    assert again["counts"] == manifest["counts"] and again["rejects_by_reason"] == manifest["rejects_by_reason"]
    leftovers = [f for _, _, files in os.walk(tmp_path / "prepared") for f in files if f.endswith(".tmp")]
    assert not leftovers and os.listdir(tmp_path / "prepared" / "v") == [os.path.basename(published(tmp_path / "prepared"))]


def test_idx_decoding_is_exact(spark, tmp_path):
    from dl_pipeline.sources import parse_idx

    images = os.path.join(SAMPLE, "fashion_mnist", "t10k-images-idx3-ubyte.gz")
    labels = os.path.join(SAMPLE, "fashion_mnist", "t10k-labels-idx1-ubyte.gz")
    raw_images = parse_idx(open(images, "rb").read())
    raw_labels = parse_idx(open(labels, "rb").read())
    assert raw_images.shape == (4443, 28, 28) and raw_labels.shape == (4443,)
    # Fashion-MNIST t10k starts: ankle boot, pullover, trouser, trouser, shirt, ...
    assert raw_labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    cfg = load_config(os.path.join(os.path.dirname(SAMPLE), "..", "conf", "fashion_mnist.yaml"), [
        f"data.train_path={images}", f"data.train_labels_path={labels}", f"prepare.output_path={tmp_path}/fm",
        "shard.max_workers=2",
    ])
    manifest = prepare_dataset(spark, cfg)
    c = manifest["counts"]
    assert c["input_rows"] == 4443 and c["rejected_rows"] == 0
    by_bytes = {}
    for img, lab in zip(raw_images, raw_labels, strict=False):
        by_bytes.setdefault(img.tobytes(), set()).add(int(lab))
    seen = 0
    for split in ("train", "val", "test"):
        rows = read_split(tmp_path / "fm", split, ["image", "label"])
        assert rows["image"].shape[1:] == (28, 28, 1) and rows["image"].dtype == np.uint8
        for image, label in zip(rows["image"], rows["label"], strict=True):
            assert int(label) in by_bytes[image[:, :, 0].tobytes()]
            seen += 1
    assert seen == c["clean_rows"] == 4443 - c["duplicate_rows"]
    assert c["splits"]["test"] > 0.15 * 4443


def test_image_folder_with_an_undecodable_file(spark, tmp_path):
    from PIL import Image

    for cls, colour in (("cats", 40), ("dogs", 200)):
        os.makedirs(tmp_path / "imgs" / cls)
        for i in range(3):
            Image.new("L", (40, 30), color=colour + i).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "dogs" / "broken.png").write_bytes(b"not a png")
    cfg = load_config(None, [
        "data.kind=image_folder", f"data.train_path={tmp_path}/imgs", f"prepare.output_path={tmp_path}/out",
        "shard.max_workers=1", "shard.row_groups_per_worker=1", "shard.val_fraction=0",
    ])
    manifest = prepare_dataset(spark, cfg)
    assert manifest["counts"]["input_rows"] == 7
    assert manifest["rejects_by_reason"] == {"undecodable_image": 1}
    assert manifest["label_names"] == ["cats", "dogs"]
    assert manifest["splits"]["train"]["per_class"] == [3, 3]


def test_user_errors_are_one_line(spark, tmp_path):
    with pytest.raises(UserError, match=r"data.train_path=/no/such.csv: no such file"):
        prepare_dataset(spark, _config(tmp_path, "data.train_path=/no/such.csv"))
    with pytest.raises(UserError, match="data.num_classes is not set"):
        prepare_dataset(spark, load_config(None, [f"data.train_path={AG_TRAIN}", f"prepare.output_path={tmp_path}/x"]))
    with pytest.raises(UserError, match="prepare.output_path is not set"):
        prepare_dataset(spark, load_config(None, [f"data.train_path={AG_TRAIN}", "data.num_classes=4"]))
    # every row rejected: a one-line error naming the reasons and where this run's rejects are
    bad = tmp_path / "all_bad.csv"
    bad.write_text('"7","a","b"\n"x","c","d"\n')
    with pytest.raises(UserError, match=r"no usable training rows \(\{\"label_not_integer\": 1, \"label_out_of_range\": 1\}\); "
                                        r"nothing was published, this run's rejects are in file://.*/out/v/[0-9TZ]+-[0-9a-f]{8}/rejects$") as err:
        prepare_dataset(spark, _config(tmp_path, f"data.train_path={bad}"))
    assert pq.read_table(str(err.value).rsplit(" ", 1)[1][len("file://"):]).num_rows == 2
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(UserError, match=r"prepare.output_path=nosuchfs://b/x: Python cannot write there \(Protocol not known"):
        prepare_dataset(spark, load_config(None, [f"data.train_path={AG_TRAIN}", "data.num_classes=4", "prepare.output_path=nosuchfs://b/x"]))
    with pytest.raises(UserError, match=r"^prepare.io=python: it reads line-mode Zhang CSV only .*; set prepare.io=auto$"):
        prepare_dataset(spark, _config(tmp_path, f"data.train_path={AG_TRAIN}", "data.multiline=true", "prepare.io=python"))
    # a gzip file cut short, found by the row estimate (in its first MiB) or by the task reading
    # it (past that): nothing published, nothing left behind
    packed = gzip.compress(gzip.open(AG_TRAIN).read() * 4)
    for keep in (50_000, len(packed) - 1000):
        cut = tmp_path / "cut.csv.gz"
        cut.write_bytes(packed[:keep])
        with pytest.raises(UserError, match=r"cut.csv.gz: not a whole gzip file .*: deliver it again or move it out of the "
                                            r"input; nothing was published$"):
            prepare_dataset(spark, _config(tmp_path, f"data.train_path={cut}", "prepare.io=python", f"prepare.output_path={tmp_path}/cut"))
        assert not (tmp_path / "cut" / "manifest.json").exists() and not list((tmp_path / "cut").glob("v/*/_spill"))


def test_own_reads_and_sparks_reader_give_the_same_shards_and_rejects(spark, bad_run, tmp_path, monkeypatch):
    """prepare.io: the spill tasks that read their byte ranges and the ones fed by Spark's text
    reader apply the same rules, so the bad lines plus the AG sample (train and test files, the
    train file cut into several byte ranges) give byte-identical shards and the same rejects."""
    from dl_pipeline import prepare

    monkeypatch.setattr(prepare, "MIN_SPLIT_BYTES", 1)  # the driver's plan: cut the ~1 MB file into ranges
    bad_csv = bad_run[0] / "bad.csv"
    data = tmp_path / "in"
    data.mkdir()
    (data / "ag.csv").write_bytes(gzip.open(AG_TRAIN).read() + bad_csv.read_bytes())
    outs = {}
    for io in ("python", "spark"):
        cfg = _config(tmp_path / io, f"data.train_path={data}", f"data.test_path={AG_TEST}", f"prepare.io={io}",
                      "shard.row_groups_per_worker=3")
        outs[io] = prepare_dataset(spark, cfg), tmp_path / io / "out"
    (py, py_out), (sp, sp_out) = outs["python"], outs["spark"]
    assert py["counts"] == sp["counts"] and py["counts"]["duplicate_rows"] > 0 and py["counts"]["rejected_rows"] >= 14
    assert shard_digests(py_out) == shard_digests(sp_out) and len(shard_digests(py_out)) >= 4

    def rejects(out):
        return sorted(pq.read_table(os.path.join(published(out), "rejects")).to_pylist(), key=lambda r: (r["origin"], r["row_number"]))

    assert rejects(py_out) == rejects(sp_out)


@pytest.mark.parametrize("fmt", ["json", "parquet", "csv"])
def test_named_column_formats(spark, tmp_path, fmt):
    import pandas as pd

    rows = pd.DataFrame({
        "topic": [1, 2, 3, 4, 2, 7],
        "headline": ["Markets rally", "Cup final", "Oil price", "New chip", "Cup final", "Bad label"],
        "body": ["stocks up", "team wins", "crude falls", "faster cpu", "team wins", "x"],
    })
    path = tmp_path / f"in.{fmt}"
    if fmt == "json":
        rows.to_json(path, orient="records", lines=True)
    elif fmt == "parquet":
        rows.to_parquet(path)
    else:
        rows.to_csv(path, index=False)
    cfg = _config(tmp_path, f"data.format={fmt}", f"data.train_path={path}", "data.label_column=topic",
                  "data.text_columns=[headline, body]", "shard.val_fraction=0")
    manifest = prepare_dataset(spark, cfg)
    assert manifest["counts"]["input_rows"] == 6
    assert manifest["counts"]["clean_rows"] == 4 and manifest["counts"]["duplicate_rows"] == 1
    assert manifest["rejects_by_reason"] == {"label_out_of_range": 1}
    with pytest.raises(UserError, match="column\\(s\\) title not found"):
        prepare_dataset(spark, _config(tmp_path, f"data.format={fmt}", f"data.train_path={path}",
                                       "data.label_column=topic", "data.text_columns=[title]"))


def test_multiline_records_with_real_newlines(spark, tmp_path):
    """Yelp-style 2-field CSV with newlines inside quoted text: Spark's multiLine CSV path."""
    path = tmp_path / "yelp.csv"
    path.write_text(
        '"1","line one\nline two of the same review"\n'
        '"2","plain review"\n'
        '"2","plain review"\n'
        '"3","only","three"\n'
        '"x","bad label"\n'
    )
    cfg = _config(tmp_path, f"data.train_path={path}", "data.num_fields=2", "data.num_classes=2",
                  "data.multiline=true", "shard.val_fraction=0")
    manifest = prepare_dataset(spark, cfg)
    c = manifest["counts"]
    assert (c["input_rows"], c["clean_rows"], c["duplicate_rows"], c["rejected_rows"]) == (5, 2, 1, 2)
    assert manifest["rejects_by_reason"] == {"label_not_integer": 1, "malformed_record": 1}
    rejects = pq.read_table(os.path.join(published(tmp_path / "out"), "rejects")).to_pandas()
    assert sorted(zip(rejects["row_number"], rejects["reason"], strict=True)) == [
        (3, "duplicate"), (4, "malformed_record"), (5, "label_not_integer")]


@pytest.mark.parametrize("line", [
    '"1","a","b"', '"1","a"', '"1","a","b","c"', '"1",",","x"', '"1","a""b","c"', '"1",""",""', ' "1","a","b"',
    '"1","a","b" ', '"1","a",b', '"1","a""","b"', '""","","', '"1","x","y"\r', '"1","","b"', '"1","a","","b"',
])
def test_zhang_line_fast_path_agrees_with_the_csv_module(line):
    from dl_pipeline.sources import parse_zhang_line

    try:
        rows = list(csv.reader([line], strict=True))
        expected = (rows[0][0], rows[0][1:], None) if len(rows) == 1 and len(rows[0]) == 3 else (None, None, "wrong_field_count")
    except csv.Error:
        expected = (None, None, "malformed_quoting")
    assert parse_zhang_line(line, 3) == expected


def test_row_groups_are_sized_by_the_data_and_near_equal():
    from dl_pipeline.config import ShardConfig
    from dl_pipeline.prepare import choose_row_groups
    from dl_pipeline.prepare_tasks import row_groups_of

    spec = {"kind": "text", "chars": {"enabled": True, "length": 1014}, "tokens": {"enabled": True, "max_tokens": 256}}
    shard = ShardConfig(max_workers=8, row_groups_per_worker=4, row_group_mb=64)
    assert choose_row_groups(100_000, spec, shard) == 32  # 4 x 8 workers
    assert choose_row_groups(5, spec, shard) == 5  # no empty groups asked for
    # size-bound: a row is 1,014 chars + 256 x 4 token bytes + 2 list offsets + ~32 for the scalars = 2,078 bytes
    assert choose_row_groups(3_600_000, spec, shard) >= 3_600_000 * 2078 / (64 << 20)
    h = np.random.default_rng(0).integers(0, 1 << 63, 320_000, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    groups = row_groups_of(h, 42, 32)
    sizes = np.bincount(groups, minlength=32)
    assert len(sizes) == 32 and sizes.min() > 9_500 and sizes.max() < 10_500  # 10,000 +- 5 sd
    assert (row_groups_of(h, 42, 32) == groups).all() and not (row_groups_of(h, 43, 32) == groups).all()  # the seed's


@pytest.mark.parametrize("seed", range(4))
def test_copies_are_decided_as_the_rule_says_one_set_at_a_time(seed):
    """``decide`` works on all sets of copies at once; the rule, one set at a time, in Python:
    CONFLICT where labels differ, else the first by (file, row number with none last, raw
    record, place) kept. Random groups with nulls, several files, both origins and ties."""
    import pyarrow as pa

    from dl_pipeline.prepare_tasks import CONFLICT, DUPLICATE, OK, decide

    rng = np.random.default_rng(seed)
    n = 3000
    h = rng.integers(0, 400, n).astype(np.uint64)
    test = rng.random(n) < 0.2
    labels = rng.choice([0, 0, 0, 1], n).astype(np.int32)
    files = [None if r < 0.05 else f"f{int(r * 3)}.csv" for r in rng.random(n)]
    numbers = [None if r < 0.1 else int(r * 50) for r in rng.random(n)]
    raws = [None if r < 0.5 else f"raw {int(r * 4)}" for r in rng.random(n)]
    rows = pa.Table.from_batches(pa.table({"source_file": pa.array(files, pa.string()), "row_number": pa.array(numbers, pa.int64()),
                                           "raw": pa.array(raws, pa.large_string())}).to_batches(max_chunksize=97))
    expected = np.zeros(n, np.int8)
    sets: dict = {}
    for i in range(n):
        sets.setdefault((int(h[i]), bool(test[i])), []).append(i)
    for copies in (c for c in sets.values() if len(c) > 1):
        if len({int(labels[i]) for i in copies}) > 1:
            expected[copies] = CONFLICT
            continue
        expected[copies] = DUPLICATE
        expected[min(copies, key=lambda i: (files[i] or "", numbers[i] is None, numbers[i] or 0, raws[i] or "", i))] = OK
    status = decide(rows, h, test, labels)
    assert (status == expected).all()
    assert {CONFLICT, DUPLICATE, OK} <= set(status.tolist())


def test_copies_are_decided_per_origin_the_first_by_file_and_row_kept():
    import pyarrow as pa

    from dl_pipeline.prepare_tasks import CONFLICT, DUPLICATE, OK, decide

    rows = pa.table({
        "h": pa.array([7, 7, 7, 9, 9, 7, 5], pa.uint64()),
        "label": pa.array([1, 1, 1, 0, 2, 1, 3], pa.int32()),
        "origin": ["train", "train", "train", "train", "train", "test", "train"],
        "source_file": ["b.csv", "a.csv", "a.csv", "a.csv", "a.csv", "t.csv", "a.csv"],
        "row_number": pa.array([1, 20, 3, 4, 5, 1, 6], pa.int64()),
        "raw": ["r"] * 7,
    })
    rows = pa.Table.from_batches(rows.to_batches(max_chunksize=3))  # chunked, as a write task reads it
    test = np.array([o == "test" for o in rows.column("origin").to_pylist()])
    # h=7 in train: a.csv row 3 kept; the test file's copy stays; h=9: two labels, both out
    status = decide(rows, rows.column("h").to_numpy(), test, rows.column("label").to_numpy())
    assert status.tolist() == [DUPLICATE, DUPLICATE, OK, CONFLICT, CONFLICT, OK, OK]
    # their rejects, taken batch by batch
    from dl_pipeline.prepare_tasks import _take_chunked

    bad = np.flatnonzero(status != OK)
    assert _take_chunked(rows, bad).to_pydict() == rows.take(pa.array(bad)).to_pydict()


def test_prepare_and_score_give_the_same_rows_the_same_reasons(spark, bad_run, ag_model, tmp_path):
    """One rule set (sources.parse_zhang_line, features.check_record): the same bad lines scored
    get the reasons prepare gave them. Only what score does not judge differs: labels and
    duplicates (score has no labels to check), and invalid UTF-8, which score keeps by policy."""
    import pyarrow.parquet as pq

    from dl_pipeline.config import replace
    from dl_pipeline.score import score_batch

    tmp, _ = bad_run
    cfg, _ = ag_model
    prepared = pq.read_table(os.path.join(published(f"{tmp}/out"), "rejects")).to_pandas()
    by_prepare = dict(zip(prepared["row_number"], prepared["reason"], strict=True))
    run = replace(cfg, score={"model_path": os.path.join(cfg.train.run_dir, "model"), "input_path": str(tmp / "bad.csv"),
                              "output_path": str(tmp_path / "scores"), "run_date": "2026-11-24", "top_k": 0,
                              "id_columns": ["row_number"]})
    score_batch(spark, run)
    scored = pq.read_table(f"{tmp_path}/scores/_rejects/dt=2026-11-24").to_pandas()
    by_score = dict(zip(scored["row_number"], scored["reason"], strict=True))
    not_judged = {"label_not_integer", "label_out_of_range", "duplicate", "conflicting_labels", "invalid_utf8"}
    expected = {n: r for n, r in by_prepare.items() if r not in not_judged}
    assert set(expected.values()) == {"wrong_field_count", "empty_text", "text_too_long", "malformed_quoting"}
    assert by_score == expected


def test_named_columns_get_the_same_reasons_in_prepare_and_score(spark, ag_model, tmp_path):
    """JSON rows, fields split by Spark: the same rule set as the line path, in both stages
    (all-null text was ``null_text`` in score and ``empty_text`` in prepare before)."""
    import json
    from collections import Counter

    import pyarrow.parquet as pq

    from dl_pipeline.config import replace
    from dl_pipeline.score import score_batch

    rows = [{"id": i, "label": 1 + i % 4, "title": f"title {i}", "text": f"fine row number {i} about the news"}
            for i in range(8)]
    rows += [{"id": 8, "label": 1, "title": None, "text": None}, {"id": 9, "label": 2, "title": "", "text": "  <br> "},
             {"id": 10, "label": 3, "title": "huge", "text": "word " * 50_000}]
    path = tmp_path / "rows.json"
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"id": 11, "title": "broken\n')
    cfg = _config(tmp_path, f"data.train_path={path}", "data.format=json", "data.text_columns=[title,text]",
                  "shard.val_fraction=0")
    prepare_dataset(spark, cfg)
    by_prepare = Counter(pq.read_table(os.path.join(published(tmp_path / "out"), "rejects")).to_pandas()["reason"])
    model_cfg, _ = ag_model
    run = replace(model_cfg, score={"model_path": os.path.join(model_cfg.train.run_dir, "model"), "input_format": "json",
                                    "input_path": str(path), "output_path": str(tmp_path / "scores"),
                                    "run_date": "2026-11-24", "top_k": 0, "id_columns": ["id"]},
                  data={"text_columns": ["title", "text"]})
    score_batch(spark, run)
    by_score = Counter(pq.read_table(f"{tmp_path}/scores/_rejects/dt=2026-11-24").to_pandas()["reason"])
    assert by_prepare == by_score == Counter({"empty_text": 2, "text_too_long": 1, "malformed_record": 1})


_KILL_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
from conftest import demo_config
from dl_pipeline.config import SparkConfig
from dl_pipeline.prepare import PAUSE_CONF, prepare_dataset
from dl_pipeline.spark import get_spark
# two executor JVMs; task 0's writer announces its Python worker's pid mid-task, the test kills it
spark = get_spark(SparkConfig(master="local-cluster[2,1,1024]", conf={"spark.sql.shuffle.partitions": "4",
                                                                      PAUSE_CONF: sys.argv[3]}))
prepare_dataset(spark, demo_config(sys.argv[2]))
"""


@pytest.mark.slow
def test_a_python_worker_killed_mid_write_on_local_cluster_gives_the_same_shards(ag_prepared, tmp_path):
    """A real SIGKILL of the Python worker writing row groups (after its first file): Spark
    retries the task on an executor, and the shards equal a clean run's, with no leftovers."""
    import signal
    import subprocess
    import sys

    script, pause = tmp_path / "kill.py", tmp_path / "pause"
    script.write_text(_KILL_RUN)
    proc = subprocess.Popen([sys.executable, str(script), os.path.dirname(os.path.abspath(__file__)), str(tmp_path),
                             str(pause)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pids = paused_pids(proc, pause)
    assert pids, "the writer never paused"
    os.kill(pids[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "Python worker exited unexpectedly" in err  # the task really died and was retried
    cfg, manifest = ag_prepared
    assert shard_digests(str(tmp_path / "prepared")) == shard_digests(cfg.prepare.output_path)
    assert json.load(open(tmp_path / "prepared" / "manifest.json"))["counts"] == manifest["counts"]
    leftovers = [f for _, _, files in os.walk(tmp_path / "prepared") for f in files if f.endswith(".tmp")]
    assert not leftovers and os.listdir(tmp_path / "prepared" / "v") == [os.path.basename(published(tmp_path / "prepared"))]


_PUBLISH_KILL_RUN = """
import sys
from dl_pipeline.config import SparkConfig, load_config
from dl_pipeline.prepare import PUBLISH_PAUSE_CONF, prepare_dataset
from dl_pipeline.spark import get_spark
spark = get_spark(SparkConfig(master="local[2]", conf={"spark.sql.shuffle.partitions": "4", PUBLISH_PAUSE_CONF: sys.argv[3]}))
prepare_dataset(spark, load_config(None, [f"data.train_path={sys.argv[1]}", f"prepare.output_path={sys.argv[2]}",
                                          "data.num_classes=4", "shard.max_workers=1", "shard.row_groups_per_worker=2"]))
"""


@pytest.mark.slow
def test_a_driver_killed_while_publishing_leaves_the_previous_dataset(spark, tmp_path):
    """A real SIGKILL of the prepare driver with the new run's files all written, just before
    the switch: readers still get the previous dataset, whole; the next run takes over the dead
    run's lock, publishes, and removes the dead run's directory."""
    import signal
    import subprocess
    import sys

    old, new = tmp_path / "old.csv", tmp_path / "new.csv"
    old.write_text("".join(f'"{1 + i % 4}","title {i}","old body {i} with words"\n' for i in range(400)))
    new.write_text("".join(f'"{1 + i % 4}","title {i}","new body {i} with words"\n' for i in range(600)))
    out = tmp_path / "out"
    prepare_dataset(spark, _config(tmp_path, f"data.train_path={old}"))
    manifest, first = (out / "manifest.json").read_bytes(), published(out)
    digests, rows = _all_digests(first), read_split(out, "train", ["row_id"])["row_id"]

    script, pause = tmp_path / "publish.py", tmp_path / "pause"
    script.write_text(_PUBLISH_KILL_RUN)
    proc = subprocess.Popen([sys.executable, str(script), str(new), str(out), str(pause)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert paused_pids(proc, pause) == [proc.pid], proc.stderr.read()[-3000:] if proc.poll() is not None else "no pause"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(os.listdir(out / "v")) == 2 and (out / "_prepare.lock").exists()  # all written, not published
    assert (out / "manifest.json").read_bytes() == manifest and _all_digests(first) == digests
    assert (read_split(out, "train", ["row_id"])["row_id"] == rows).all()

    again = prepare_dataset(spark, _config(tmp_path, f"data.train_path={new}"))
    assert again["counts"]["input_rows"] == 600 and again["previous_root"] == os.path.relpath(first, out)
    assert sorted(os.listdir(out / "v")) == sorted({os.path.basename(first), os.path.basename(published(out))})
    assert len(read_split(out, "train", ["row_id"])["row_id"]) == again["splits"]["train"]["rows"]
    assert not (out / "_prepare.lock").exists()


def test_line_mode_reads_a_record_with_line_breaks_as_one_record(spark, tmp_path):
    """Line mode (the default) joins a quoted field's lines into one record, counted once; a
    joined record that does not parse is rejected once; a stray quote is rejected alone, and
    the lines after it are kept. The joined records read the same as data.multiline's."""
    good = [f'"{1 + i % 4}","title {i}","body number {i} with words"' for i in range(400)]
    spans = ['"2","title with a\nbreak","body"', '"3","t","body line one\nline two\nline three"']
    lines = good[:10] + [spans[0]] + good[10:200] + [spans[1]] + good[200:]
    path, whole = tmp_path / "in.csv", tmp_path / "whole.csv"
    whole.write_text("\n".join(lines) + "\n")
    bad = ['"1","two fields\nonly"', '"4","a stray "quote","x"']
    path.write_text("\n".join(lines[:300] + bad + lines[300:]) + "\n")
    assert path.read_text().count("\n") == 400 + 2 + 3 + 2 + 1  # physical lines

    manifest = prepare_dataset(spark, _config(tmp_path, f"data.train_path={path}"))
    c = manifest["counts"]
    assert (c["input_rows"], c["clean_rows"], c["rejected_rows"]) == (404, 402, 2)
    assert manifest["rejects_by_reason"] == {"malformed_multiline_record": 1, "malformed_quoting": 1}
    rejects = pq.read_table(os.path.join(published(tmp_path / "out"), "rejects")).to_pandas()
    assert sorted(zip(rejects["row_number"], rejects["reason"], rejects["raw"], strict=True)) == [
        (304, "malformed_multiline_record", bad[0]), (306, "malformed_quoting", bad[1])]

    def row_ids(out):
        splits = json.load(open(out / "manifest.json"))["splits"]
        return {s: set(read_split(out, s, ["row_id"])["row_id"]) for s in splits if splits[s]["rows"]}

    lenient = prepare_dataset(spark, _config(tmp_path, f"data.train_path={whole}", "data.multiline=true",
                                             f"prepare.output_path={tmp_path}/multiline"))
    assert lenient["counts"]["clean_rows"] == 402
    assert row_ids(tmp_path / "out") == row_ids(tmp_path / "multiline")


def test_a_repeated_record_of_several_lines_is_rejected_with_all_its_lines(spark, tmp_path):
    """A kept row's raw text is read back from its byte range when it turns out a duplicate; a
    record of several lines has no one line to read back, so it keeps its whole text."""
    record = '"3","t","body line one\nline two"'
    good = [f'"{1 + i % 4}","title {i}","body number {i} with words"' for i in range(40)]
    path = tmp_path / "in.csv"
    path.write_text("\n".join(good[:10] + [record] + good[10:] + [record, good[0]]) + "\n")
    manifest = prepare_dataset(spark, _config(tmp_path, f"data.train_path={path}"))
    assert (manifest["counts"]["clean_rows"], manifest["counts"]["duplicate_rows"]) == (41, 2)
    rejects = pq.read_table(os.path.join(published(tmp_path / "out"), "rejects")).to_pandas()
    assert sorted(zip(rejects["row_number"], rejects["reason"], rejects["raw"], strict=True)) == [
        (43, "duplicate", record), (45, "duplicate", good[0])]


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5])
def test_line_records_join_across_batches_and_stop_at_a_file_end(cut):
    from dl_pipeline.sources import CONTINUATION, LineRecords

    lines = ['"1","a","b"', '"2","c', 'd","e"', '"3","open', 'never closed', '"4","x","y"']
    files = ["f"] * 5 + ["g"]
    records = LineRecords(3, " ", 1000)
    out = [records.feed(files[:cut], lines[:cut]), records.feed(files[cut:], lines[cut:]), records.finish()]
    assert [row for r in out for row in zip(r.label, r.reason, r.text, r.records(), strict=True)] == [
        ("1", None, "a b", None), ("2", None, "c\nd e", '"2","c\nd","e"'), (None, CONTINUATION, None, None),
        (None, "malformed_quoting", None, None), (None, "wrong_field_count", None, None), ("4", None, "x y", None)]


def test_the_parse_udf_gets_every_result_column_from_either_kind_of_batch():
    """Spark's line reader hands LineRecords' results on as the UDF's frame: a batch of lines
    that each parsed (no record column kept) and one with a record of several lines."""
    from dl_pipeline.sources import CONTINUATION, LineRecords, _parsed_frame

    records = LineRecords(3, " ", 1000)
    usual = _parsed_frame(records.feed(["f"] * 2, ['"1","a","b"', '"2","c","d"'])).to_dict("list")
    joined = _parsed_frame(records.feed(["f"] * 3, ['"3","e', 'f","g"', '"x"'])).to_dict("list")
    assert usual == {"label": ["1", "2"], "reason": [None, None], "text": ["a b", "c d"], "text_reason": [None, None],
                     "record": [None, None]}
    assert joined == {"label": ["3", None, None], "reason": [None, CONTINUATION, "wrong_field_count"],
                      "text": ["e\nf g", None, None], "text_reason": [None, None, None], "record": ['"3","e\nf","g"', None, None]}


def test_workers_of_a_session_we_start_get_the_worker_env(spark):
    """prepare's tasks copy rows through large buffers: their workers run with mimalloc and glibc's
    malloc on 2 MiB pages (spark.WORKER_ENV), which each reads when it loads, so only the
    environment a worker starts with can set it."""
    from dl_pipeline.spark import WORKER_ENV

    keys = sorted(WORKER_ENV)
    seen = spark.sparkContext.parallelize(range(2), 2).map(lambda _: [os.environ.get(k) for k in keys]).collect()
    assert WORKER_ENV == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "MIMALLOC_LARGE_OS_PAGES": "1"}
    assert seen == [["glibc.malloc.hugetlb=1", "1"]] * 2


def test_a_spilled_line_keeps_its_text_only_where_it_cannot_be_read_back(tmp_path):
    """A spill task keeps a local file's lines as byte ranges, read back for rejects; a file on
    another filesystem (an object store: a request a line) keeps its text."""
    import fsspec
    import pyarrow as pa

    from dl_pipeline import features
    from dl_pipeline.line_splits import LineSplit, read_back
    from dl_pipeline.prepare_tasks import PrepareTask, spill_lines

    data = b'"1","a title","a body"\n"2","another","row"\n\n"3","third","one"\n'
    (tmp_path / "in.csv").write_bytes(data)
    fsspec.filesystem("memory").pipe("/spill_test/in.csv", data)
    cfg = _config(tmp_path)
    for url, located in ((f"file://{tmp_path}/in.csv", True), ("memory:///spill_test/in.csv", False)):
        task = PrepareTask(root=f"file://{tmp_path}/run-{located}", spec=features.text_spec(cfg.features, cfg.data), groups=1,
                           seed=1, val_fraction=0.0, test_cut=0.0, num_classes=4, label_base=1, class_names=None,
                           num_fields=3, separator=cfg.data.title_separator, max_chars=1000, reject_invalid_utf8=False)
        report = spill_lines(LineSplit(url, 0, len(data)), "train", 0, task)
        assert {"kind": "lines", "batch": 0, "n": 4} in report
        rows = pa.ipc.open_file(str(tmp_path / f"run-{located}" / "_spill" / "part-00000.arrow")).read_all().sort_by("row_number")
        assert rows.column("row_number").to_pylist() == [1, 2, 4]
        if located:
            assert rows.column("raw").null_count == 3
            spans = np.column_stack([rows.column("raw_start").to_numpy(), rows.column("raw_end").to_numpy()])
            assert read_back(url, spans) == data.decode().split("\n")[:2] + [data.decode().split("\n")[3]]
        else:
            assert rows.column("raw").to_pylist() == [data.decode().split("\n")[i] for i in (0, 1, 3)]
            assert rows.column("raw_start").null_count == 3
