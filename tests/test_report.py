"""`dl-pipeline report`: a short console summary and a self-contained report.html, rendered by a
real headless Chromium (system package) driven over the DevTools protocol."""

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import AG_TEST, ROOT
from dl_pipeline.config import replace
from dl_pipeline.score import score_batch

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def reported(spark, ag_model, tmp_path_factory):
    """The AG sample prepared, trained and scored for two dates, then `dl-pipeline report` run."""
    cfg, _ = ag_model
    tmp = tmp_path_factory.mktemp("report")
    with gzip.open(AG_TEST, "rt", encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(400)]
    (tmp / "in.csv").write_text("".join(lines) + '"2","",""\n')
    cfg = replace(cfg, score={"model_path": os.path.join(cfg.train.run_dir, "model"), "input_path": str(tmp / "in.csv"),
                              "output_path": str(tmp / "scores"), "id_columns": ["row_number"]})
    for date in ("2026-12-01", "2026-12-02"):
        score_batch(spark, replace(cfg, score={"run_date": date}))
    sets = [f"{k}={v}" for k, v in (("data.train_path", cfg.data.train_path), ("prepare.output_path", cfg.prepare.output_path),
                                    ("train.data_path", cfg.train.data_path), ("train.run_dir", cfg.train.run_dir),
                                    ("score.output_path", cfg.score.output_path))]
    proc = subprocess.run([sys.executable, "-m", "dl_pipeline.cli", "report", "--quiet",
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cfg, proc.stdout


def test_report_prints_a_short_aligned_summary(reported):
    from dl_pipeline.dataset import read_manifest

    cfg, out = reported
    lines = out.splitlines()
    assert 10 <= len(lines) <= 25 and max(map(len, lines)) < 160, out  # not one long line of JSON
    counts = read_manifest(cfg.prepare.output_path)["counts"]
    metrics = json.load(open(os.path.join(cfg.train.run_dir, "metrics.json")))
    assert f"rows in     {counts['input_rows']:>10,}" in out and f"rejected    {counts['rejected_rows']:>10,}" in out
    assert f"test {100 * metrics['test']['accuracy']:.1f}%" in out
    assert "2026-12-01        401 in       400 scored       1 rejected" in out and "2026-12-02" in out
    assert out.rstrip().endswith(os.path.join(cfg.train.run_dir, "report.html"))


def _render(url: str, profile: str) -> dict:
    """Load ``url`` in headless Chromium; returns the console errors, exceptions, the URLs it
    requested and what the page shows (title, headings, images: alt, loaded, natural width)."""
    import websocket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1", "--remote-allow-origins=*",
                             f"--user-data-dir={profile}", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                page = next(p for p in pages if p["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                assert proc.poll() is None and time.time() < deadline, "chromium did not start"
                time.sleep(0.3)
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        ids = iter(range(1, 1000))
        events: list[dict] = []

        def call(method, **params):
            i = next(ids)
            ws.send(json.dumps({"id": i, "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == i:
                    return msg.get("result", {})
                events.append(msg)

        for domain in ("Page", "Runtime", "Log", "Network"):
            call(f"{domain}.enable")
        call("Page.navigate", url=url)
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            events.append(json.loads(ws.recv()))
        shown = call("Runtime.evaluate", returnByValue=True, expression=(
            "JSON.stringify({title: document.title, h2: [...document.querySelectorAll('h2')].map(h => h.textContent),"
            "images: [...document.images].map(i => [i.alt, i.complete, i.naturalWidth])})"))
        ws.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    errors = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "warning"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] in ("error", "warning"))]
    requested = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    return {"errors": errors, "requested": requested, **json.loads(shown["result"]["value"])}


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (make setup installs the system package where it can)")
def test_report_html_renders_in_a_real_browser_with_its_images_and_no_errors(reported, tmp_path):
    cfg, _ = reported
    page = os.path.join(cfg.train.run_dir, "report.html")
    shown = _render(f"file://{page}", str(tmp_path / "profile"))
    assert shown["errors"] == [], shown["errors"]
    assert [u for u in shown["requested"] if not u.startswith(("file:", "data:"))] == []  # self-contained: no network
    assert shown["title"] == "dl_pipeline report" and shown["h2"] == ["Prepare", "Train", "Score"]
    images = {alt: (done, width) for alt, done, width in shown["images"]}
    assert set(images) == {"learning curves", "confusion matrix"}
    assert all(done and width > 100 for done, width in images.values()), images
    text = open(page).read()
    assert "Predicted labels, 2026-12-01" in text and "Predicted labels, 2026-12-02" in text and "empty_text" in text
