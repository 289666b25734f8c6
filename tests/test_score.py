"""Batch scoring: parity with in-process predictions, idempotent re-runs, crash safety, rejects."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import AG_TEST, AG_TRAIN, ROOT, SAMPLE, paused_pids, read_split
from dl_pipeline.config import replace
from dl_pipeline.features import clean_record
from dl_pipeline.score import DROP_ROW_CONF, INJECT_FAILURE_CONF, score_batch
from dl_pipeline.scoring import predict_texts
from dl_pipeline.sources import parse_zhang_line


def _ag_test_rows():
    with gzip.open(AG_TEST, "rt", encoding="utf-8") as fh:
        return [parse_zhang_line(line.rstrip("\n"), 3) for line in fh]


def _partition(out, date):
    return pq.read_table(f"{out}/dt={date}").to_pandas()


@pytest.fixture(scope="module")
def ag_test_plain(tmp_path_factory):
    """The AG News test CSV, uncompressed: what score's own tasks read (score.io=auto)."""
    path = tmp_path_factory.mktemp("plain") / "test.csv"
    path.write_bytes(gzip.open(AG_TEST).read())
    return str(path)


@pytest.fixture(scope="module")
def scored(spark, ag_model, ag_test_plain, tmp_path_factory):
    cfg, _ = ag_model
    out = tmp_path_factory.mktemp("scores")
    cfg = replace(cfg, score={"model_path": os.path.join(cfg.train.run_dir, "model"), "input_path": ag_test_plain,
                              "output_path": str(out), "run_date": "2026-11-20", "id_columns": ["row_number"], "top_k": 2,
                              "max_records_per_batch": 1000})
    return cfg, score_batch(spark, cfg)["summary"]


def test_predictions_equal_in_process_predictions(scored):
    from dl_pipeline.bundle import load_bundle

    cfg, summary = scored
    assert summary["rows_in"] == summary["scored"] == 7600 and summary["rejected"] == 0
    df = _partition(cfg.score.output_path, "2026-11-20").sort_values("row_number")
    assert df["row_number"].tolist() == list(range(1, 7601))
    bundle = load_bundle(cfg.score.model_path)
    texts = [clean_record(parts, ". ") for _, parts, _ in _ag_test_rows()]
    local = predict_texts(bundle, texts, batch_size=512)
    np.testing.assert_array_equal(df["prediction"].to_numpy(), local["index"] + 1)
    np.testing.assert_allclose(df["probability"].to_numpy(), local["probability"], atol=1e-6)
    assert set(df["label_name"]) <= {"World", "Sports", "Business", "Sci/Tech"}
    assert df["model_version"].nunique() == 1 and df["model_version"].iloc[0] == bundle.version
    first = df["top_k"].iloc[0]
    assert len(first) == 2 and first[0]["probability"] >= first[1]["probability"]
    labels = np.array([int(lab) for lab, _, _ in _ag_test_rows()])
    assert (df["prediction"].to_numpy() == labels).mean() > 0.75
    runs = json.load(open(f"{cfg.score.output_path}/_runs/2026-11-20.json"))
    assert runs["rows_in"] == len(_ag_test_rows()) == runs["scored"] + runs["rejected"]


def test_every_stored_row_has_the_features_score_computes_from_its_raw_line(spark, ag_prepared):
    """Train/serve parity, row by row: each row prepare stored, in every split (keyed by its
    row_id, the content hash of its cleaned text), holds exactly the chars, tokens, length and words
    that score's own text path (``scoring.text_batch``: parse, check, clean, featurize) computes from
    the raw CSV line it came from."""
    import pandas as pd
    import pyarrow as pa

    from dl_pipeline.features import content_hashes
    from dl_pipeline.prepare_tasks import row_ids
    from dl_pipeline.scoring import text_batch
    from dl_pipeline.sources import parse_and_clean_lines

    cfg, manifest = ag_prepared
    spec = manifest["featurizer"]
    lines = []
    for path in (AG_TRAIN, AG_TEST):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines += [line.rstrip("\n") for line in fh]
    _, reasons, feats = text_batch(pd.DataFrame({"raw": lines}), spec, cfg.data.max_text_chars, cfg.data.title_separator, 3)
    parsed = parse_and_clean_lines(lines, 3, cfg.data.title_separator, cfg.data.max_text_chars, reject_invalid_utf8=False)
    texts = [t for t, r in zip(parsed.text, reasons, strict=True) if r is None]
    ids = row_ids(content_hashes(pa.array(texts, pa.string()))).to_pylist()
    names = ("chars", "tokens", "length", "words")
    computed = {row_id: tuple(feats[n][i].tobytes() for n in names) for i, row_id in enumerate(ids)}
    checked = 0
    for split in ("train", "val", "test"):
        stored = read_split(cfg.prepare.output_path, split, ["row_id", *names])
        for i, row_id in enumerate(stored["row_id"]):
            assert tuple(np.asarray(stored[n][i], dtype=feats[n].dtype).tobytes() for n in names) == computed[row_id], (split, i)
            checked += 1
    assert checked == sum(manifest["splits"][s]["rows"] for s in ("train", "val", "test")) > 17000


def test_rerunning_a_date_replaces_exactly_that_partition(spark, scored):
    cfg, _ = scored
    out = cfg.score.output_path
    score_batch(spark, replace(cfg, score={"run_date": "2026-11-21"}))
    before = _partition(out, "2026-11-20")
    other = _partition(out, "2026-11-21")
    score_batch(spark, cfg)  # the same date again
    after = _partition(out, "2026-11-20")
    assert len(after) == 7600 and after["row_number"].is_unique
    assert sorted(after["row_number"]) == sorted(before["row_number"])
    assert after["scored_at"].min() > before["scored_at"].max()  # rewritten, not left as it was
    untouched = _partition(out, "2026-11-21")
    assert len(untouched) == 7600 and untouched["scored_at"].equals(other["scored_at"])  # the other date is untouched
    whole = spark.read.parquet(out)
    assert whole.count() == 2 * 7600
    assert whole.groupBy("dt", "row_number").count().filter("count > 1").count() == 0


@pytest.mark.parametrize("io", ["python", "spark"])
def test_crash_mid_run_keeps_previous_partition_then_rerun_completes(spark, scored, io):
    cfg, _ = scored
    cfg = replace(cfg, score={"io": io})
    out = cfg.score.output_path
    spark.conf.set(INJECT_FAILURE_CONF, "true")
    try:
        with pytest.raises(Exception, match="injected scoring failure"):
            score_batch(spark, cfg)
    finally:
        spark.conf.unset(INJECT_FAILURE_CONF)
    assert not [f for _, _, fs in os.walk(os.path.join(out, "_staging")) for f in fs]  # the failed run's parts are gone
    kept = _partition(out, "2026-11-20")
    assert len(kept) == 7600 and kept["row_number"].is_unique
    summary = score_batch(spark, cfg)["summary"]
    assert summary["scored"] == 7600
    assert len(_partition(out, "2026-11-20")) == 7600


def test_bad_rows_go_to_rejects_with_reasons(spark, ag_model, tmp_path):
    cfg, _ = ag_model
    rows = [
        {"id": 1, "title": "Markets", "text": "Stocks rose on Monday"},
        {"id": 2, "title": None, "text": None},
        {"id": 3, "title": "", "text": "   "},
        {"id": 4, "title": "huge", "text": "word " * 50_000},
        {"id": 5, "title": "numbers", "text": 12345},
    ]
    lines = [json.dumps(r) for r in rows] + ['{"id": 6, "title": "broken']
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "2026-11-22.json").write_text("\n".join(lines) + "\n")
    cfg = replace(cfg, score={"model_path": os.path.join(cfg.train.run_dir, "model"), "input_format": "json",
                              "input_path": str(tmp_path / "in" / "{date}.json"), "output_path": str(tmp_path / "out"),
                              "run_date": "2026-11-22", "id_columns": ["id"]},
                  data={"text_columns": ["title", "text"]})
    summary = score_batch(spark, cfg)["summary"]
    assert summary["rows_in"] == 6 and summary["scored"] == 2 and summary["rejected"] == 4
    assert summary["rejects_by_reason"] == {"empty_text": 2, "malformed_record": 1, "text_too_long": 1}
    good = _partition(tmp_path / "out", "2026-11-22")
    assert sorted(good["id"].tolist()) == [1, 5]
    bad = pq.read_table(f"{tmp_path}/out/_rejects/dt=2026-11-22").to_pandas()
    assert spark.read.parquet(str(tmp_path / "out")).count() == 2  # rejects never break the table
    assert sorted(zip(bad["id"].fillna(-1).astype(int), bad["reason"], strict=True)) == [
        (-1, "malformed_record"), (2, "empty_text"), (3, "empty_text"), (4, "text_too_long")]
    assert all(len(r) <= 4096 for r in bad["raw"])

    # The input is fixed and the date re-run: its stale rejects go, other dates' stay.
    os.rename(tmp_path / "out" / "_rejects" / "dt=2026-11-22", tmp_path / "out" / "_rejects" / "dt=2026-11-21")
    shutil.copytree(tmp_path / "out" / "_rejects" / "dt=2026-11-21", tmp_path / "out" / "_rejects" / "dt=2026-11-22")
    (tmp_path / "in" / "2026-11-22.json").write_text(lines[0] + "\n")
    summary = score_batch(spark, cfg)["summary"]
    assert summary["rows_in"] == 1 and summary["rejected"] == 0
    assert sorted(os.listdir(tmp_path / "out" / "_rejects")) == ["dt=2026-11-21"]
    assert _partition(tmp_path / "out", "2026-11-22")["id"].tolist() == [1]

    # Every row bad on a re-run: the date's earlier predictions go as well (0 scored, 0 rows).
    (tmp_path / "in" / "2026-11-22.json").write_text(lines[2] + "\n")
    summary = score_batch(spark, cfg)["summary"]
    assert (summary["rows_in"], summary["scored"], summary["rejected"]) == (1, 0, 1)
    assert not (tmp_path / "out" / "dt=2026-11-22").exists()
    assert pq.read_table(f"{tmp_path}/out/_rejects/dt=2026-11-22").to_pandas()["reason"].tolist() == ["empty_text"]


def test_missing_model_is_a_user_error(spark, scored, tmp_path):
    from dl_pipeline.errors import UserError

    cfg, _ = scored
    with pytest.raises(UserError, match="not a model bundle"):
        score_batch(spark, replace(cfg, score={"model_path": str(tmp_path)}))


def test_nested_text_column_is_rejected_not_fatal(spark, ag_model, tmp_path):
    cfg, _ = ag_model
    rows = [{"id": 1, "title": "a", "text": {"nested": "x"}}, {"id": 2, "title": "b", "text": {"nested": "y"}}]
    (tmp_path / "in.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = replace(cfg, score={"model_path": os.path.join(cfg.train.run_dir, "model"), "input_format": "json",
                              "input_path": str(tmp_path / "in.json"), "output_path": str(tmp_path / "out"),
                              "run_date": "2026-11-22", "id_columns": ["id"]},
                  data={"text_columns": ["title", "text"]})
    summary = score_batch(spark, cfg)["summary"]
    assert (summary["rows_in"], summary["scored"], summary["rejected"]) == (2, 0, 2)
    assert summary["rejects_by_reason"] == {"text_not_string": 2}


def test_small_input_is_spread_over_every_core(spark, tmp_path):
    from dl_pipeline.score import _spread_over_cores

    path = tmp_path / "small.csv"
    path.write_text("".join(f'"1","t{i}","b{i}"\n' for i in range(100)))
    scan = spark.read.text(str(path))
    assert scan.rdd.getNumPartitions() == 1  # one file under 4 MB: one task
    spread = _spread_over_cores(spark, scan, scan)
    assert spread.rdd.getNumPartitions() == spark.sparkContext.defaultParallelism == 2
    assert sorted(r.value for r in spread.collect()) == sorted(r.value for r in scan.collect())
    assert _spread_over_cores(spark, spread, spread) is spread  # already spans the cores


def test_raw_csv_lines_are_parsed_checked_and_scored_in_one_pass(spark, ag_model, tmp_path):
    cfg, _ = ag_model
    lines = [
        b'"3","Stocks","Markets rose on Monday"',
        b'"1","bad","bytes \xff\xfe kept as U+FFFD and scored"',  # scoring keeps undecodable bytes
        b'"2","huge","' + b"word " * 50_000 + b'"',
        b'"4","bro"ken","x"',
        b'"1","",""',
    ]
    path = tmp_path / "in.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    cfg = replace(cfg, score={"model_path": os.path.join(cfg.train.run_dir, "model"), "input_path": str(path),
                              "output_path": str(tmp_path / "out"), "run_date": "2026-11-22",
                              "id_columns": ["row_number", "label_raw"]},
                  data={"max_text_chars": 100_000})
    summary = score_batch(spark, cfg)["summary"]
    assert (summary["rows_in"], summary["scored"], summary["rejected"]) == (5, 2, 3)
    assert summary["rejects_by_reason"] == {"empty_text": 1, "malformed_quoting": 1, "text_too_long": 1}
    good = _partition(tmp_path / "out", "2026-11-22").sort_values("row_number")
    assert good["row_number"].tolist() == [1, 2] and good["label_raw"].tolist() == ["3", "1"]


def test_own_io_scores_every_line_as_spark_io_does(spark, ag_model, tmp_path, monkeypatch):
    """score.io=python (each task reads its byte range, writes its Parquet part) gives the same
    rows, numbers, predictions, rejects and summary as Spark's text reader and writer, over LF,
    CRLF and lone-CR lines, blank and space-only lines, invalid UTF-8, U+2028 and form feeds (not
    line ends to Hadoop), no final newline, a hidden file, and splits cut inside lines; and a
    gzip file of two members (one split, decompressed in pieces that end inside lines)."""
    import gzip

    import pandas as pd

    from dl_pipeline import line_splits, score_tasks

    cfg, _ = ag_model
    folder = tmp_path / "in"
    folder.mkdir()
    odd = [b'"3","Stocks","Markets rose on Monday"', b"", b"   ", b'"1","bad","bytes \xff\xfe kept \xe2\x82 too"',
           b'"2","a","b"\r', b'"4","bro"ken","x"', b'"1","",""', b'"2","sep\xe2\x80\xa8u","x\x0cy"', b'"1","t","b"']
    (folder / "a.csv").write_bytes(b"\n".join(odd) + b'\r\n"3","x","y"\r"4","last","no newline"')
    ends = [b"\n", b"\r\n", b"\r", b"\n\n", b"\n  \r\n"]  # cut inside and across line ends, blank lines between
    (folder / "b.csv").write_bytes(b"\xef\xbb\xbf" + b"".join(b'"%d","title %d","body %d of day"' % (i % 4 + 1, i, i) + ends[i % 5]
                                                         for i in range(2000)))
    (folder / "_hidden.csv").write_bytes(b'"1","never","read"\n')
    day = b"".join(b'"%d","zipped %d","a day\'s body %d"' % (i % 4 + 1, i, i) + ends[i % 5] for i in range(600))
    (folder / "c.csv.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + day[:7001]) + gzip.compress(day[7001:]))
    monkeypatch.setattr(score_tasks, "MAX_SPLIT_BYTES", 4000)  # ~18 splits, cut inside lines
    # The gzip file in ~25 pieces (the splits carry the size to the tasks), the first read ending
    # between a CRLF's CR and LF.
    monkeypatch.setattr(line_splits, "CHUNK_BYTES", (b"\xef\xbb\xbf" + day).index(b"\r\n", 900) + 1)
    tables, summaries = {}, {}
    for io in ("spark", "python"):
        run = replace(cfg, score={"model_path": os.path.join(cfg.train.run_dir, "model"), "input_path": str(folder),
                                  "output_path": str(tmp_path / io), "run_date": "2026-11-22", "io": io, "top_k": 2,
                                  "id_columns": ["source_file", "row_number", "label_raw"]})
        summary = score_batch(spark, run)["summary"]
        assert summary["io"] == io
        summaries[io] = {k: v for k, v in summary.items() if k not in ("seconds", "output_path", "io")}
        tables[io] = [pq.read_table(f"{tmp_path}/{io}/{sub}dt=2026-11-22").to_pandas()
                      .sort_values(["source_file", "row_number"], ignore_index=True) for sub in ("", "_rejects/")]
    assert summaries["python"] == summaries["spark"]
    assert (summaries["python"]["rows_in"], summaries["python"]["rejected"]) == (2609, 2)
    first_b = tables["python"][0].query("source_file.str.endswith('b.csv')")
    assert first_b["label_raw"].iloc[0] == "1" and first_b["row_number"].iloc[:5].tolist() == [1, 2, 3, 4, 6]
    for own, theirs in zip(tables["python"], tables["spark"], strict=True):
        assert list(own.columns) == list(theirs.columns)
        assert own["scored_at"].nunique() == 1
        own, theirs = own.drop(columns="scored_at"), theirs.drop(columns="scored_at")
        if "top_k" in own:
            assert [list(x) for x in own.pop("top_k")] == [list(x) for x in theirs.pop("top_k")]
        pd.testing.assert_frame_equal(own, theirs)
    assert tables["python"][0]["row_number"].tolist()[:6] == [1, 4, 5, 8, 9, 10]
    whole = spark.read.parquet(str(tmp_path / "python"))  # Spark reads what the tasks wrote, with its types
    assert whole.schema == spark.read.parquet(str(tmp_path / "spark")).schema and whole.count() == 2607
    zipped = tables["python"][0].query("source_file.str.endswith('c.csv.gz')")
    assert len(zipped) == 600 and zipped["label_raw"].iloc[0] == "1" and zipped["row_number"].iloc[-1] == 839


def test_python_lists_a_folder_as_sparks_reader_does(spark, tmp_path):
    """fsutil.expand (prepare's and score's own listing) names the files Spark's text source
    reads: it skips _ and . names (Parquet's _metadata too) and files being copied, but keeps _k=v."""
    from pyspark.sql import functions as F

    from dl_pipeline import fsutil

    for name in ("a.csv", "_hidden.csv", ".dot.csv", "b.csv._COPYING_", "_k=v.csv", "_metadata", "_common_metadata"):
        (tmp_path / name).write_text(f"{name}\n")
    read = {r[0] for r in spark.read.text(str(tmp_path)).select(F.input_file_name()).collect()}
    assert set(fsutil.expand(str(tmp_path))) == read == {f"file://{tmp_path}/{n}" for n in ("a.csv", "_k=v.csv")}


def test_auto_leaves_a_gzip_file_to_spark_when_it_would_hold_up_the_cores(tmp_path):
    """A gzip file is one task: auto reads it itself while it holds at most twice an even share of
    the input per core (its bytes weighed x3), else Spark's reader spreads its lines over the cores."""
    import fsspec

    from dl_pipeline.score_tasks import gzip_holds_up_the_cores as holds_up

    fs = fsspec.filesystem("file")
    for name, size in (("big.csv.gz", 1000), ("small.csv.gz", 100), ("plain.csv", 3000)):
        (tmp_path / name).write_bytes(b"x" * size)
    big, small, plain = (str(tmp_path / n) for n in ("big.csv.gz", "small.csv.gz", "plain.csv"))
    assert not holds_up(fs, [big], 2) and holds_up(fs, [big], 3)  # one file: fine on 2 cores, not on 3
    assert not holds_up(fs, [plain], 64)  # plain files are cut into ranges
    # weights 3000 + 300 + 3000 = 6300: an even share on 4 cores is 1575, twice that 3150
    assert not holds_up(fs, [big, small, plain], 4) and holds_up(fs, [big, small, plain], 5)


def test_own_io_refuses_what_it_cannot_read_in_one_line(spark, scored):
    import bz2

    from dl_pipeline.errors import UserError

    cfg, _ = scored
    packed = os.path.join(os.path.dirname(cfg.score.input_path), "day.csv.bz2")
    with open(cfg.score.input_path, "rb") as fh, bz2.open(packed, "wb") as out:
        out.write(fh.read())
    with pytest.raises(UserError, match=r"score.io=python cannot read .*day.csv.bz2: compressed other than gzip .*; set score.io=auto"):
        score_batch(spark, replace(cfg, score={"io": "python", "input_path": packed}))
    cut = os.path.join(os.path.dirname(cfg.score.input_path), "cut.csv.gz")
    with open(AG_TEST, "rb") as fh, open(cut, "wb") as out:
        out.write(fh.read()[:50_000])  # a delivery cut short
    with pytest.raises(UserError, match=r"cut.csv.gz: not a whole gzip file .*: deliver it again or move it out of the input"):
        score_batch(spark, replace(cfg, score={"input_path": cut}))
    spaced = os.path.join(os.path.dirname(cfg.score.input_path), "a day.csv")
    shutil.copy(cfg.score.input_path, spaced)
    with pytest.raises(UserError, match=r"a day.csv: characters that Spark URL-encodes in source_file; set score.io=auto"):
        score_batch(spark, replace(cfg, score={"io": "python", "input_path": spaced}))
    with pytest.raises(UserError, match=r"score.io=python scores Zhang CSV lines .* set score.io=auto"):
        score_batch(spark, replace(cfg, score={"io": "python", "input_format": "json"}))


# ---------------------------------------------------------------------------------------------
# Image models
# ---------------------------------------------------------------------------------------------

FM_IMAGES = os.path.join(SAMPLE, "fashion_mnist", "t10k-images-idx3-ubyte.gz")
FM_LABELS = os.path.join(SAMPLE, "fashion_mnist", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(scope="module")
def fm_model(spark, tmp_path_factory):
    """(config, bundle path) of a LeNet trained 1 epoch in-process on the bundled Fashion-MNIST
    sample, prepared from its idx files."""
    from dl_pipeline.config import load_config
    from dl_pipeline.prepare import prepare_dataset
    from dl_pipeline.train.driver import train_model

    tmp = tmp_path_factory.mktemp("fm")
    cfg = load_config(os.path.join(ROOT, "conf", "fashion_mnist.yaml"), [
        f"data.train_path={FM_IMAGES}", f"data.train_labels_path={FM_LABELS}", f"prepare.output_path={tmp}/prepared",
        f"train.data_path={tmp}/prepared", f"train.run_dir={tmp}/run", "shard.max_workers=2", "train.launcher=local",
        "train.epochs=1", "train.progress=false",
    ])
    prepare_dataset(spark, cfg)
    train_model(cfg)
    return cfg, os.path.join(cfg.train.run_dir, "model")


def _fm_pixels(n):
    from dl_pipeline.sources import parse_idx

    return parse_idx(open(FM_IMAGES, "rb").read())[:n]


def _encode(pixels, fmt="PNG", size=None):
    import io

    from PIL import Image

    img = Image.fromarray(pixels, mode="L")
    img = img.resize(size, Image.NEAREST) if size else img
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _expected(bundle, blobs):
    """In-process predictions for encoded images: decoded exactly as prepare decodes them."""
    from dl_pipeline.features import decode_image
    from dl_pipeline.scoring import predict

    pixels = np.stack([decode_image(b, bundle.featurizer) for b in blobs])
    return predict(bundle, {"image": pixels}, 64, 0)


def test_image_files_are_scored_like_in_process_and_bad_files_rejected(spark, fm_model, tmp_path):
    from dl_pipeline.bundle import load_bundle

    cfg, model = fm_model
    day = tmp_path / "in" / "2026-11-22"
    (day / "shelf").mkdir(parents=True)
    pixels = _fm_pixels(30)
    files = {}
    for i, px in enumerate(pixels):  # real Fashion-MNIST test images: PNG, some JPEG, some 2x size
        fmt, size = ("JPEG", None) if i % 10 == 3 else ("PNG", (56, 56) if i % 10 == 7 else None)
        name = day / ("shelf" if i % 2 else "") / f"item{i:02d}.{fmt.lower()}"
        files[str(name)] = _encode(px, fmt, size)
        name.write_bytes(files[str(name)])
    (day / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    big = _encode(pixels[0], size=(280, 280))
    (day / "big.png").write_bytes(big)
    with open(day / "huge.jpg", "wb") as fh:  # 3 GB, sparse: reading it would fail the job
        fh.truncate(3 << 30)
    (day / "notes.txt").write_text("not an image: not a row")
    limit = max(len(b) for b in files.values()) + 1
    assert len(big) > limit
    out = tmp_path / "out"
    run = replace(cfg, score={"model_path": model, "input_format": "image_files", "input_path": str(tmp_path / "in" / "{date}"),
                              "output_path": str(out), "run_date": "2026-11-22", "id_columns": ["path", "length", "modificationTime"],
                              "max_image_bytes": limit, "top_k": 3})
    summary = score_batch(spark, run)["summary"]
    assert (summary["rows_in"], summary["scored"], summary["rejected"]) == (33, 30, 3)
    # Small files in one task per core (plus one that lists the oversize ones), not 32 a task.
    from dl_pipeline.score import _read_images

    frame = _read_images(spark, run.score, str(day))[0]
    assert frame.rdd.getNumPartitions() <= spark.sparkContext.defaultParallelism + 1
    assert summary["rejects_by_reason"] == {"image_too_large": 2, "undecodable_image": 1}

    df = _partition(out, "2026-11-22").sort_values("path")
    paths = sorted(files)
    assert [p.removeprefix("file:") for p in df["path"]] == paths
    assert df["length"].tolist() == [len(files[p]) for p in paths]
    assert df["modificationTime"].notna().all()
    bundle = load_bundle(model)
    local = _expected(bundle, [files[p] for p in paths])
    np.testing.assert_array_equal(df["prediction"].to_numpy(), local["index"])  # label_base 0
    np.testing.assert_allclose(df["probability"].to_numpy(), local["probability"], atol=1e-5)
    assert df["label_name"].tolist() == [bundle.labels["names"][i] for i in local["index"]]
    assert all(len(t) == 3 for t in df["top_k"])
    bad = pq.read_table(f"{out}/_rejects/dt=2026-11-22").to_pandas()
    assert {os.path.basename(r): reason for r, reason in zip(bad["raw"], bad["reason"], strict=True)} == {
        "big.png": "image_too_large", "huge.jpg": "image_too_large", "broken.png": "undecodable_image"}


def test_image_tasks_grow_with_the_input_not_below_the_cores(spark):
    from dl_pipeline.sources import image_tasks

    cores = spark.sparkContext.defaultParallelism
    assert image_tasks(spark, spark.range(0, 10, numPartitions=1)) == cores
    assert image_tasks(spark, spark.range(0, 1000, numPartitions=320)) == max(cores, 10)  # ~32 scan tasks each


def test_image_bytes_in_parquet_are_scored_and_bad_values_rejected(spark, fm_model, tmp_path):
    import pyarrow as pa

    from dl_pipeline.bundle import load_bundle

    cfg, model = fm_model
    blobs = [_encode(px) for px in _fm_pixels(5)]
    pq.write_table(pa.table({"sku": list(range(1, 9)),
                             "image": [*blobs, None, b"garbage", _encode(_fm_pixels(1)[0], size=(280, 280))]}),
                   tmp_path / "in.parquet")
    out = tmp_path / "out"
    run = replace(cfg, score={"model_path": model, "input_format": "parquet", "input_path": str(tmp_path / "in.parquet"),
                              "output_path": str(out), "run_date": "2026-11-22", "id_columns": ["sku"],
                              "max_image_bytes": max(map(len, blobs))})
    summary = score_batch(spark, run)["summary"]
    assert (summary["rows_in"], summary["scored"], summary["rejected"]) == (8, 5, 3)
    df = _partition(out, "2026-11-22").sort_values("sku")
    assert df["sku"].tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(df["prediction"].to_numpy(), _expected(load_bundle(model), blobs)["index"])
    bad = pq.read_table(f"{out}/_rejects/dt=2026-11-22").to_pandas().sort_values("sku")
    assert bad["reason"].tolist() == ["null_image", "undecodable_image", "image_too_large"]
    assert bad["raw"].tolist() == ['{"sku":6}', '{"sku":7}', '{"sku":8}']

    # A text column where the image should be: every row rejected, the job does not fail.
    pq.write_table(pa.table({"sku": [1, 2], "image": ["aGVsbG8=", "d29ybGQ="]}), tmp_path / "b64.parquet")
    summary = score_batch(spark, replace(run, score={"input_path": str(tmp_path / "b64.parquet")}))["summary"]
    assert summary["rejects_by_reason"] == {"image_not_binary": 2} and summary["scored"] == 0


def test_model_and_input_kinds_must_match(spark, fm_model, ag_model, tmp_path):
    from dl_pipeline.errors import UserError

    cfg, model = fm_model
    run = replace(cfg, score={"model_path": model, "input_format": "zhang_csv", "input_path": AG_TEST,
                              "output_path": str(tmp_path / "out"), "run_date": "2026-11-22"})
    with pytest.raises(UserError, match="an image model scores images: set score.input_format=image_files"):
        score_batch(spark, run)
    text_cfg, _ = ag_model
    run = replace(text_cfg, score={"model_path": os.path.join(text_cfg.train.run_dir, "model"), "input_format": "image_files",
                                   "input_path": str(tmp_path), "output_path": str(tmp_path / "out")})
    with pytest.raises(UserError, match="a text model cannot score image files"):
        score_batch(spark, run)


def test_a_day_without_images_empties_the_date(spark, fm_model, tmp_path):
    cfg, model = fm_model
    day = tmp_path / "in"
    day.mkdir()
    for i, px in enumerate(_fm_pixels(2)):
        (day / f"{i}.png").write_bytes(_encode(px))
    out = tmp_path / "out"
    run = replace(cfg, score={"model_path": model, "input_format": "image_files", "input_path": str(day),
                              "output_path": str(out), "run_date": "2026-11-22"})
    assert score_batch(spark, run)["summary"]["scored"] == 2
    for f in day.iterdir():
        f.unlink()
    (day / "readme.txt").write_text("no images today")
    summary = score_batch(spark, run)["summary"]
    assert (summary["rows_in"], summary["scored"], summary["rejected"]) == (0, 0, 0)
    assert not (out / "dt=2026-11-22").exists() and not (out / "_rejects" / "dt=2026-11-22").exists()


def test_image_features_are_identical_in_prepare_and_score(spark, tmp_path):
    """Train/serve parity for images: pixels stored by prepare (image folder) equal the pixels
    score feeds the model for the same files, including files resized to the spec."""
    import pandas as pd

    from dl_pipeline.config import load_config
    from dl_pipeline.features import image_spec
    from dl_pipeline.prepare import prepare_dataset
    from dl_pipeline.scoring import image_batch

    blobs = {}
    for i, px in enumerate(_fm_pixels(12)):
        cls = tmp_path / "imgs" / f"class{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        fmt, size = ("JPEG", None) if i % 4 == 1 else ("PNG", (40, 40) if i % 4 == 2 else None)
        blobs[i] = _encode(px, fmt, size)
        (cls / f"{i}.{fmt.lower()}").write_bytes(blobs[i])
    cfg = load_config(None, ["data.kind=image_folder", f"data.train_path={tmp_path}/imgs", f"prepare.output_path={tmp_path}/out",
                             "data.image_height=28", "data.image_width=28", "data.image_channels=1", "shard.max_workers=1",
                             "shard.row_groups_per_worker=1", "shard.val_fraction=0", "shard.test_fraction=0"])
    manifest = prepare_dataset(spark, cfg)
    assert manifest["counts"]["clean_rows"] == 12
    images = read_split(tmp_path / "out", "train", ["image"])["image"]
    assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8
    stored = sorted(img.tobytes() for img in images)
    reasons, feats = image_batch(pd.DataFrame({"content": list(blobs.values()), "reason": [None] * 12}), image_spec(cfg.data))
    assert reasons == [None] * 12 and feats["image"].shape == (12, 28, 28, 1)
    assert sorted(img.tobytes() for img in feats["image"]) == stored


@pytest.mark.parametrize("io", ["python", "spark"])
def test_a_lost_row_fails_the_run_and_keeps_the_previous_partition(spark, scored, io):
    """rows_in is counted from the input on its own: a row lost on the way is caught."""
    from dl_pipeline.errors import PipelineError

    cfg, _ = scored
    cfg = replace(cfg, score={"io": io})
    before = _partition(cfg.score.output_path, "2026-11-20")
    spark.conf.set(DROP_ROW_CONF, "true")
    try:
        with pytest.raises(PipelineError, match=r"7600 rows in, 7\d\d\d scored \+ 0 rejected .* nothing was written"):
            score_batch(spark, cfg)
    finally:
        spark.conf.unset(DROP_ROW_CONF)
    after = _partition(cfg.score.output_path, "2026-11-20")
    assert len(after) == 7600 and after["scored_at"].equals(before["scored_at"])


def test_score_settings_are_checked_at_start_and_the_session_is_left_as_it_was(spark, scored, caplog):
    from dl_pipeline.errors import UserError

    cfg, _ = scored
    with pytest.raises(UserError, match=r"score.top_k=5 but .* has 4 classes"):
        score_batch(spark, replace(cfg, score={"top_k": 5}))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "777")
    try:
        small = replace(cfg, score={"id_columns": [], "top_k": 0, "run_date": "2026-11-21", "max_records_per_batch": 500})
        with caplog.at_level("WARNING", logger="dl_pipeline.score"):
            score_batch(spark, small)
        assert spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch") == "777"
        assert "score.id_columns is empty" not in caplog.text  # a Zhang CSV has default ids (source_file, row_number)
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")


@pytest.mark.parametrize("damage, message", [
    ("not_safetensors", "model.safetensors: not a safetensors file"),
    ("other_weights", "model.safetensors: the weights do not match model.json"),
    ("bad_json", "labels.json: not valid JSON"),
    # features computed another way would score every row wrong, silently: refused by version
    ("other_featurizer", "featurizer.json: featurizer version 99, but this dl_pipeline computes versions 1, 2: score "
                         "with dl_pipeline 0.1.0"),
    ("word64_as_version_1", "featurizer.json: tokens.hash 'word64' is not a featurizer version 1 hash"),
])
def test_a_broken_bundle_is_one_line_exit_2_before_any_spark_job(ag_model, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    cfg, _ = ag_model
    bundle = tmp_path / "model"
    shutil.copytree(os.path.join(cfg.train.run_dir, "model"), bundle)
    if damage == "not_safetensors":
        (bundle / "model.safetensors").write_bytes(b"\x80\x04this is a pickle, not tensors")
    elif damage == "other_weights":
        state = load_file(str(bundle / "model.safetensors"))
        state["fc.weight"] = state["fc.weight"][:2]  # a 2-class head under a 4-class model.json
        save_file(state, str(bundle / "model.safetensors"))
    elif damage in ("other_featurizer", "word64_as_version_1"):
        doc = json.loads((bundle / "featurizer.json").read_text())
        (bundle / "featurizer.json").write_text(json.dumps({**doc, "version": 99 if damage == "other_featurizer" else 1}))
    else:
        (bundle / "labels.json").write_text("{not json")
    out = subprocess.run([sys.executable, "-m", "dl_pipeline.cli", "score", "--set", f"score.model_path={bundle}",
                          "--set", f"score.input_path={AG_TEST}", "--set", f"score.output_path={tmp_path / 'out'}",
                          "--set", "spark.master=local[1]"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_a_version_1_bundle_still_scores_with_its_crc32_ids(spark, ag_model, tmp_path):
    """Bundles trained before featurizer version 2 (crc32 token ids) keep scoring, with the ids
    they were trained on: the bundle's spec, not this code's default, picks the hash."""
    from dl_pipeline.bundle import load_bundle

    cfg, _ = ag_model
    path = tmp_path / "model"
    shutil.copytree(os.path.join(cfg.train.run_dir, "model"), path)
    doc = json.loads((path / "featurizer.json").read_text())
    assert doc["version"] == 2 and doc["tokens"]["hash"] == "word64"
    (path / "featurizer.json").write_text(json.dumps({**doc, "version": 1, "tokens": {**doc["tokens"], "hash": "crc32"}}))
    with gzip.open(AG_TEST, "rt", encoding="utf-8") as fh:
        (tmp_path / "in.csv").write_text("".join(next(fh) for _ in range(300)))
    run = replace(cfg, score={"model_path": str(path), "input_path": str(tmp_path / "in.csv"),
                              "output_path": str(tmp_path / "out"), "run_date": "2026-11-23", "top_k": 0,
                              "id_columns": ["row_number"]})
    assert score_batch(spark, run)["summary"]["scored"] == 300
    got = _partition(tmp_path / "out", "2026-11-23").sort_values("row_number")["probability"].to_numpy()
    v1, v2 = load_bundle(str(path)), load_bundle(os.path.join(cfg.train.run_dir, "model"))
    texts = [clean_record(parts, ". ") for _, parts, _ in _ag_test_rows()[:300]]
    np.testing.assert_allclose(got, predict_texts(v1, texts, batch_size=512)["probability"], atol=1e-6)
    assert np.abs(got - predict_texts(v2, texts, batch_size=512)["probability"]).max() > 0.01  # other ids, other scores


def test_a_model_retrained_at_the_same_path_is_served_at_once(spark, ag_model, tmp_path):
    """Python workers are reused across jobs: their model cache is keyed by model version."""
    import torch

    from dl_pipeline.bundle import load_bundle, save_bundle

    cfg, _ = ag_model
    path = tmp_path / "model"
    shutil.copytree(os.path.join(cfg.train.run_dir, "model"), path)
    rows = tmp_path / "in.csv"
    rows.write_text('"1","Stocks rally","Oil falls as markets rise"\n"2","Cup final","The team wins the title"\n')
    run = replace(cfg, score={"model_path": str(path), "input_path": str(rows), "output_path": str(tmp_path / "out"),
                              "run_date": "2026-11-22", "top_k": 0, "id_columns": ["row_number"]})
    first = score_batch(spark, run)["summary"]["model_version"]
    old = load_bundle(str(path))
    with torch.no_grad():
        old.model.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))  # now every row is class 4
    save_bundle(str(path), old.model, old.model_spec, old.featurizer, old.labels, old.metrics)
    second = score_batch(spark, run)["summary"]["model_version"]
    df = _partition(tmp_path / "out", "2026-11-22")
    assert second != first and set(df["model_version"]) == {second}
    assert df["prediction"].tolist() == [4, 4]


def test_two_runs_of_one_date_do_not_interleave_and_a_dead_runs_lock_is_taken_over(spark, ag_model, tmp_path):
    """Real processes: while one run of a date holds its lock (held at a pause, its predictions
    staged), a second refuses with one line (exit 2); the first, let go on, ends whole. A lock
    left by a killed run (its pid is gone) is taken over."""
    cfg, _ = ag_model
    out, date, pause = tmp_path / "out", "2026-11-23", tmp_path / "pause"
    lock = out / "_runs" / f"{date}.lock"
    cmd = [sys.executable, "-m", "dl_pipeline.cli", "score", "--set", f"score.model_path={cfg.train.run_dir}/model",
           "--set", f"score.input_path={AG_TEST}", "--set", f"score.output_path={out}", "--set", f"score.run_date={date}",
           "--set", "spark.master=local[1]"]
    first = subprocess.Popen([*cmd, "--set", f"spark.conf.spark.dl_pipeline.test.score_pause=staged:{pause}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    (pid,) = paused_pids(first, pause)
    assert lock.exists(), "the first run holds no lock while it works"
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    os.remove(pause / str(pid))  # the first run goes on
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"score for {date} is running already" in errors[0]
    df = _partition(out, date)
    assert len(df) == 7600 and df["row_number"].is_unique and not lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "earlier"}))
    run = replace(cfg, score={"model_path": os.path.join(cfg.train.run_dir, "model"), "input_path": AG_TEST,
                              "output_path": str(out), "run_date": date, "top_k": 0})
    summary = score_batch(spark, run)["summary"]
    assert summary["scored"] == 7600 and not lock.exists()
    assert summary["io"] == "python"  # auto: one gzip file on 2 cores is read by the task itself


@pytest.mark.parametrize("point", ["staged", "commit"])
def test_a_driver_killed_while_writing_keeps_or_finishes_a_whole_result(spark, ag_model, tmp_path, caplog, point):
    """A real SIGKILL of the scoring driver with the new predictions staged but not the rejects
    ("staged"): the date keeps its previous result whole. Killed between moving the new
    predictions into place and moving the new rejects ("commit"): the journal it left makes the
    next run of the date finish that commit first. Either way the next run gives each row
    once and clears the killed run's staged files."""
    import logging
    import signal

    cfg, _ = ag_model
    out, date, pause = tmp_path / "out", "2026-11-25", tmp_path / "pause"
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("".join(f'"1","title {i}","first day body {i}"\n' for i in range(20)) + '"1","",""\n' * 2)
    b.write_text("".join(f'"2","title {i}","second day body {i}"\n' for i in range(30)) + '"1","",""\n' * 3)
    run = replace(cfg, score={"model_path": os.path.join(cfg.train.run_dir, "model"), "input_path": str(a),
                              "output_path": str(out), "run_date": date, "top_k": 0})
    score_batch(spark, run)
    cmd = [sys.executable, "-m", "dl_pipeline.cli", "score", "--set", f"score.model_path={cfg.train.run_dir}/model",
           "--set", f"score.input_path={b}", "--set", f"score.output_path={out}", "--set", f"score.run_date={date}",
           "--set", "spark.master=local[1]", "--set", f"spark.conf.spark.dl_pipeline.test.score_pause={point}:{pause}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert paused_pids(proc, pause) == [proc.pid], "the run never paused"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    journal = out / "_runs" / f"{date}.commit"
    if point == "staged":  # nothing moved: the previous result, whole
        assert len(_partition(out, date)) == 20 and len(pq.read_table(f"{out}/_rejects/dt={date}")) == 2
        assert not journal.exists() and (out / "_staging" / date).exists()
    else:  # half-way: the new predictions are in place, the old rejects still are; the journal says what is left
        assert len(_partition(out, date)) == 30 and len(pq.read_table(f"{out}/_rejects/dt={date}")) == 2
        assert journal.exists()

    with caplog.at_level(logging.WARNING, logger="dl_pipeline.score"):
        summary = score_batch(spark, replace(run, score={"input_path": str(b)}))["summary"]
    finished = any("finished the commit of 2026-11-25" in r.getMessage() for r in caplog.records)
    assert finished == (point == "commit")
    assert (summary["scored"], summary["rejected"]) == (30, 3)
    assert len(_partition(out, date)) == 30 and len(pq.read_table(f"{out}/_rejects/dt={date}")) == 3
    assert not journal.exists() and not (out / "_staging" / date).exists()
    assert spark.read.parquet(str(out)).count() == 30


def test_a_lock_lost_with_another_machine_is_taken_over_once_stale(tmp_path):
    """A job cluster's driver that dies leaves its date's lock, and the scheduler's retry runs on
    another machine: a lock older than score.stale_lock_after_s is taken over, a fresh one is not."""
    import datetime as dt

    from dl_pipeline.errors import UserError
    from dl_pipeline.fsutil import exclusive_lock

    lock = tmp_path / "_runs" / "2026-12-01.lock"
    lock.parent.mkdir()

    def held_since(hours):
        started = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours)).isoformat(timespec="seconds")
        lock.write_text(json.dumps({"host": "a-lost-driver", "pid": 4242, "started": started}))

    held_since(0.1)
    with pytest.raises(UserError, match="score for 2026-12-01 is running already .*a-lost-driver pid 4242"):
        with exclusive_lock(str(lock), {"started": "now"}, "score for 2026-12-01", stale_after_s=6 * 3600):
            pass
    held_since(7)
    with pytest.raises(UserError, match="is running already"):  # 0: never by age
        with exclusive_lock(str(lock), {"started": "now"}, "score for 2026-12-01", stale_after_s=0):
            pass
    with exclusive_lock(str(lock), {"started": "now"}, "score for 2026-12-01", stale_after_s=6 * 3600):
        assert json.loads(lock.read_text())["host"] != "a-lost-driver"  # ours now
    assert not lock.exists()
