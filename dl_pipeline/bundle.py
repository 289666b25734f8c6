"""Model bundle: what train writes and score reads. Loading it runs no pickled code.

``<run_dir>/model/``::

    model.safetensors   weights
    model.json          model spec (name, sizes, num_classes) -> models.build_model
    featurizer.json     the prepared dataset's featurizer spec (train/serve parity)
    labels.json         {"label_base": 1, "names": [...]}
    metrics.json        final val/test metrics
    versions.json       library versions and the model version string
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from dl_pipeline import fsutil
from dl_pipeline.errors import UserError

FILES = ("model.safetensors", "model.json", "featurizer.json", "labels.json", "metrics.json", "versions.json")


def model_version_at(path: str) -> str | None:
    """The model version a local bundle folder's ``versions.json`` records, or None if it has none."""
    try:
        with open(os.path.join(path, "versions.json")) as fh:
            return json.load(fh)["model_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class Bundle:
    model: Any  # torch.nn.Module, eval mode
    model_spec: dict[str, Any]
    featurizer: dict[str, Any]
    labels: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, Any]

    @property
    def version(self) -> str:
        return self.versions["model_version"]

    @cached_property
    def model_featurizer(self) -> dict[str, Any]:
        """The featurizer spec with only the feature this model reads switched on (a fastText
        model needs no 1014-char quantization per row); computed once per loaded bundle."""
        from dl_pipeline.models import FEATURE_OF

        need = FEATURE_OF[self.model_spec["name"]]
        spec = json.loads(json.dumps(self.featurizer))
        for name in ("chars", "tokens"):
            if name in spec:
                spec[name]["enabled"] = name == need
        return spec


def save_bundle(path: str, model, model_spec: dict, featurizer: dict, labels: dict, metrics: dict) -> str:
    """Write the bundle to ``path`` (local dir) atomically: a temp dir renamed into place."""
    import torch
    from safetensors.torch import save_file

    path = fsutil.local_path(path) or path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".model-", dir=parent)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "model.safetensors"), "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:12]
    versions = {
        "model_version": f"{model_spec['name']}-{digest}",
        "dl_pipeline": __import__("dl_pipeline").__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for name, doc in (("model.json", model_spec), ("featurizer.json", featurizer), ("labels.json", labels),
                      ("metrics.json", metrics), ("versions.json", versions)):
        with open(os.path.join(tmp, name), "w") as fh:
            json.dump(doc, fh, indent=2, sort_keys=True)
    _share(tmp)
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(tmp, path)
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    return path


def _share(directory: str) -> None:
    """Readable by other users, as the umask allows (a scoring job often runs under another
    account): mkdtemp makes the directory 0700, whatever the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o755 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o644 & ~umask)


def load_bundle(path: str, device: str = "cpu") -> Bundle:
    """Rebuild the model from model.json and load safetensors weights; eval mode."""
    from safetensors.torch import load

    from dl_pipeline.models import build_model

    url = fsutil.to_url(path)
    missing = [f for f in FILES if not fsutil.exists(fsutil.join(url, f))]
    if missing:
        raise UserError(f"{path}: not a model bundle (missing {', '.join(missing)}); point score.model_path at <train.run_dir>/model")
    docs = {}
    for f in FILES:
        if f.endswith(".json"):
            try:
                docs[f] = json.loads(fsutil.read_text(fsutil.join(url, f)))
            except (ValueError, UnicodeDecodeError) as exc:
                raise UserError(f"{path}/{f}: not valid JSON ({exc}); re-export the bundle with `dl-pipeline train`") from None
    check_featurizer(path, docs["featurizer.json"], docs["versions.json"])
    fs, p = fsutil.fs_and_path(fsutil.join(url, "model.safetensors"))
    with fs.open(p, "rb") as fh:
        blob = fh.read()
    try:
        state = load(blob)
    except Exception as exc:  # safetensors raises its own SafetensorError (no common base to name)
        raise UserError(f"{path}/model.safetensors: not a safetensors file ({str(exc).splitlines()[0][:200]}); "
                        "re-export the bundle with `dl-pipeline train`") from None
    try:
        model = build_model(docs["model.json"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}/model.json: cannot build the model ({type(exc).__name__}: {exc}); re-export the bundle") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing/unexpected keys or shapes: the weights are another model's
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"{path}/model.safetensors: the weights do not match model.json ({detail})") from None
    model.to(device).eval()
    return Bundle(model, docs["model.json"], docs["featurizer.json"], docs["labels.json"], docs["metrics.json"], docs["versions.json"])


def check_featurizer(path: str, featurizer: dict[str, Any], versions: dict[str, Any]) -> None:
    """A bundle scores only where this code computes its features exactly as training saw them
    (``features.not_computable``: its featurizer version and token hash known here), or every
    prediction would be silently wrong."""
    from dl_pipeline.features import not_computable

    why = not_computable(featurizer)
    if why:
        made_by = versions.get("dl_pipeline", "?")
        raise UserError(f"{path}/featurizer.json: {why}: score with dl_pipeline {made_by} (which trained it), or re-run "
                        "prepare and train with this one")
