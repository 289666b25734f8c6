"""`dl-pipeline report`: what a run produced, from its files (manifest, metrics, score summaries)."""

from __future__ import annotations

import json
import os
from typing import Any

from dl_pipeline import dataset, fsutil
from dl_pipeline.config import Config
from dl_pipeline.errors import UserError


def report(cfg: Config) -> dict[str, Any]:
    """Collect prepare counts, train metrics and score runs for the configured paths."""
    out: dict[str, Any] = {}
    data_path = cfg.train.data_path or cfg.prepare.output_path
    if data_path and fsutil.exists(fsutil.join(fsutil.to_url(data_path), dataset.MANIFEST)):
        m = dataset.read_manifest(data_path)
        out["prepare"] = {"path": data_path, "counts": m["counts"], "rejects_by_reason": m["rejects_by_reason"],
                          "row_groups": {s: m["splits"][s]["row_groups"] for s in dataset.SPLITS}}
    run_dir = cfg.train.run_dir
    if run_dir and os.path.exists(os.path.join(run_dir, "metrics.json")):
        with open(os.path.join(run_dir, "metrics.json")) as fh:
            m = json.load(fh)
        out["train"] = {"run_dir": run_dir, "val": m["val"], "test": m["test"], "epochs_run": m["epochs_run"],
                        "world_size": m["world_size"], "mode": m["mode"]}
    score_out = cfg.score.output_path
    runs = fsutil.join(fsutil.to_url(score_out), "_runs") if score_out else ""
    if runs and fsutil.exists(runs):
        fs, path = fsutil.fs_and_path(runs)
        out["score"] = [json.loads(fs.cat(p)) for p in sorted(fs.ls(path, detail=False)) if p.endswith(".json")]
    if not out:
        raise UserError("nothing to report: set prepare.output_path / train.run_dir / score.output_path (e.g. --config conf/demo.yaml)")
    return {**out, "summary": out}
