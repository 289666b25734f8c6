"""`dl-pipeline report`: what a run produced, from its files (manifest, metrics, plots, score runs).

``report`` returns the facts (``summary``), a short aligned text for the console (``text``) and
writes ``report.html``: one self-contained page (plots inline as base64 PNG, styles inline, no
script and no network) with the counts, learning curves, confusion matrix, rejects by reason and
the predicted-label distribution of every score date.
"""

from __future__ import annotations

import base64
import html
import json
import os
from typing import Any

from dl_pipeline import dataset, fsutil
from dl_pipeline.bundle import model_version_at
from dl_pipeline.config import Config
from dl_pipeline.errors import UserError

SCORE_KEYS = ("run_date", "rows_in", "scored", "rejected", "rejects_by_reason", "predictions_by_label", "model_version",
              "model_uri", "seconds")
TEXT_SCORE_RUNS = 7  # the console lists the last week of dates; the page lists them all


def report(cfg: Config) -> dict[str, Any]:
    """Collect prepare counts, train metrics and score runs for the configured paths, print-ready."""
    facts = collect(cfg)
    if not facts:
        raise UserError("nothing to report: set prepare.output_path / train.run_dir / score.output_path (e.g. --config conf/demo.yaml)")
    page = write_html(facts, _report_dir(cfg))
    return {"summary": {**facts, "report_html": page}, "text": text_summary(facts, page)}


def collect(cfg: Config) -> dict[str, Any]:
    """{prepare, train, score}: whichever of the three the config's paths hold."""
    out: dict[str, Any] = {}
    data_path = cfg.train.data_path or cfg.prepare.output_path
    if data_path and fsutil.exists(fsutil.join(fsutil.to_url(data_path), dataset.MANIFEST)):
        m = dataset.read_manifest(data_path)
        out["prepare"] = {"path": data_path, "root": m.get("root", ""), "counts": m["counts"],
                          "rejects_by_reason": m["rejects_by_reason"], "splits": {s: m["splits"][s]["rows"] for s in dataset.SPLITS}}
    run_dir = cfg.train.run_dir
    if run_dir and os.path.exists(os.path.join(run_dir, "metrics.json")):
        with open(os.path.join(run_dir, "metrics.json")) as fh:
            m = json.load(fh)
        out["train"] = {"run_dir": run_dir, "val": m["val"], "test": m["test"], "epochs_run": m["epochs_run"],
                        "world_size": m["world_size"], "mode": m["mode"], "model_version": model_version_at(os.path.join(run_dir, "model")) or "",
                        "history": [{k: h[k] for k in ("epoch", "train_loss", "val_loss", "val_accuracy") if k in h}
                                    for h in m.get("history", []) if h.get("type", "epoch") == "epoch"]}
    score_out = cfg.score.output_path
    runs = fsutil.join(fsutil.to_url(score_out), "_runs") if score_out else ""
    if runs and fsutil.exists(runs):
        fs, path = fsutil.fs_and_path(runs)
        records = [json.loads(fs.cat(p)) for p in sorted(fs.ls(path, detail=False)) if p.endswith(".json")]
        out["score"] = {"path": score_out, "runs": [{k: r[k] for k in SCORE_KEYS if k in r} for r in records]}
    return out


def _report_dir(cfg: Config) -> str:
    """Where report.html goes: the run dir, else the score output, else the prepared dataset (local)."""
    for path in (cfg.train.run_dir, cfg.score.output_path, cfg.train.data_path or cfg.prepare.output_path):
        local = fsutil.local_path(fsutil.to_url(path)) if path else None
        if local and os.path.isdir(local):
            return local
    return os.getcwd()


# ---------------------------------------------------------------------------------------------
# The console summary
# ---------------------------------------------------------------------------------------------


def _n(x: int) -> str:
    return f"{x:,}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _reasons(by_reason: dict[str, int]) -> str:
    return ", ".join(f"{r} {_n(n)}" for r, n in sorted(by_reason.items(), key=lambda kv: -kv[1])) or "-"


def text_summary(facts: dict[str, Any], page: str) -> str:
    """A few aligned lines: rows and rejects, splits, accuracy, model version, the last score runs."""
    lines = []
    if "prepare" in facts:
        p, c = facts["prepare"], facts["prepare"]["counts"]
        lines += [f"prepare   {p['path']}" + (f"  ({p['root']})" if p["root"] else ""),
                  f"  rows in     {_n(c['input_rows']):>10}",
                  f"  clean       {_n(c['clean_rows']):>10}",
                  f"  duplicates  {_n(c.get('duplicate_rows', 0)):>10}",
                  f"  rejected    {_n(c['rejected_rows']):>10}   {_reasons(p['rejects_by_reason'])}",
                  "  splits      " + "  ".join(f"{s} {_n(n)}" for s, n in p["splits"].items())]
    if "train" in facts:
        t = facts["train"]
        lines += [f"train     {t['run_dir']}  ({t['mode']}, {t['world_size']} rank(s), {t['epochs_run']} epochs)",
                  f"  model       {t['model_version'] or '-'}",
                  f"  accuracy    val {_pct(t['val']['accuracy'])} ({_n(t['val']['rows'])} rows)   "
                  f"test {_pct(t['test']['accuracy'])} ({_n(t['test']['rows'])} rows)"]
    if "score" in facts:
        s = facts["score"]
        lines.append(f"score     {s['path']}  ({len(s['runs'])} date(s))")
        for r in s["runs"][-TEXT_SCORE_RUNS:]:
            lines.append(f"  {r['run_date']}  {_n(r['rows_in']):>9} in {_n(r['scored']):>9} scored {_n(r['rejected']):>7} rejected"
                         f"   {r.get('model_version', '-')}   {r.get('seconds', 0):.1f} s")
    lines.append(f"report    {page}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# report.html
# ---------------------------------------------------------------------------------------------

STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:960px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 10px;text-align:left}td.n{text-align:right}
.bar{background:#4c78a8;height:12px;display:inline-block;vertical-align:middle}.muted{color:#777}
img{max-width:100%;border:1px solid #eee}"""


def _img(path: str, alt: str) -> str:
    """An <img> with the PNG inline (a data: URI), or a note when the file is absent."""
    if not os.path.exists(path):
        return f'<p class="muted">{html.escape(alt)}: not found ({html.escape(path)})</p>'
    with open(path, "rb") as fh:
        data = base64.b64encode(fh.read()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _bars(counts: dict[str, int]) -> str:
    """A table of counts with a proportional bar each."""
    if not counts:
        return '<p class="muted">none</p>'
    top = max(counts.values()) or 1
    rows = "".join(f'<tr><td>{html.escape(str(k))}</td><td class="n">{_n(v)}</td>'
                   f'<td><span class="bar" style="width:{max(1, round(240 * v / top))}px"></span></td></tr>'
                   for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"<table>{rows}</table>"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="n">{_n(c)}</td>' if isinstance(c, int) else f"<td>{html.escape(str(c))}</td>"
                                    for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render_html(facts: dict[str, Any]) -> str:
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>dl_pipeline report</title><style>{STYLE}</style>"
             "</head><body><h1>dl_pipeline report</h1>"]
    if "prepare" in facts:
        p, c = facts["prepare"], facts["prepare"]["counts"]
        parts += [f"<h2>Prepare</h2><p>{html.escape(p['path'])} <span class=muted>{html.escape(p['root'])}</span></p>",
                  _table(["rows in", "clean", "duplicates", "rejected", *p["splits"]],
                         [[c["input_rows"], c["clean_rows"], c.get("duplicate_rows", 0), c["rejected_rows"], *p["splits"].values()]]),
                  "<h3>Rejects by reason</h3>", _bars(p["rejects_by_reason"])]
    if "train" in facts:
        t = facts["train"]
        parts += [f"<h2>Train</h2><p>{html.escape(t['run_dir'])}: model {html.escape(t['model_version'] or '-')}, "
                  f"{html.escape(t['mode'])}, {t['world_size']} rank(s), {t['epochs_run']} epochs</p>",
                  _table(["split", "accuracy", "loss", "rows"],
                         [[s, _pct(t[s]["accuracy"]), "-" if t[s]["loss"] is None else f"{t[s]['loss']:.4f}", t[s]["rows"]]
                          for s in ("val", "test")]),
                  "<h3>Learning curves</h3>", _img(os.path.join(t["run_dir"], "learning_curve.png"), "learning curves"),
                  _table(["epoch", "train loss", "val loss", "val accuracy"],
                         [[h["epoch"], f"{h['train_loss']:.4f}", f"{h['val_loss']:.4f}", _pct(h["val_accuracy"])] for h in t["history"]]),
                  "<h3>Confusion matrix (test)</h3>", _img(os.path.join(t["run_dir"], "confusion_matrix.png"), "confusion matrix")]
    if "score" in facts:
        s = facts["score"]
        parts.append(f"<h2>Score</h2><p>{html.escape(s['path'])}</p>")
        parts.append(_table(["date", "rows in", "scored", "rejected", "rejects", "model", "seconds"],
                            [[r["run_date"], r["rows_in"], r["scored"], r["rejected"], _reasons(r.get("rejects_by_reason", {})),
                              r.get("model_uri") or r.get("model_version", "-"), f"{r.get('seconds', 0):.1f}"] for r in s["runs"]]))
        for r in s["runs"]:
            if r.get("predictions_by_label"):
                parts += [f"<h3>Predicted labels, {html.escape(r['run_date'])}</h3>", _bars(r["predictions_by_label"])]
    parts.append("</body></html>")
    return "".join(parts)


def write_html(facts: dict[str, Any], directory: str) -> str:
    path = os.path.join(directory, "report.html")
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(render_html(facts))
    os.replace(tmp, path)
    return path
